"""Tests of moe_engine.mtl.statistics: task_expert_mass, the Mod-Squad mutual-information loss, check_task_ids.

The loss is checked on cases small enough to compute by hand, and its gradient against float64
autograd of a loop transcription of REFERENCES.md's equation (no eps, 0 log 0 = 0):
    P(t, e) = M[t, e] / sum(M),  L_MI = - sum_{t,e} P(t,e) log( P(t,e) / (P(t) P(e)) )
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_engine.mtl.statistics import check_task_ids, mutual_information_loss, task_expert_mass


def mi_loss_transcription(probs_TE: torch.Tensor, task_ids_T: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """-I(task; expert) one cell at a time, in probs_TE's dtype."""
    num_tokens, num_experts = probs_TE.shape
    zero = torch.zeros((), dtype=probs_TE.dtype)
    mass = [[zero for _ in range(num_experts)] for _ in range(num_tasks)]
    for t in range(num_tokens):
        for e in range(num_experts):
            mass[int(task_ids_T[t])][e] = mass[int(task_ids_T[t])][e] + probs_TE[t, e]
    total = sum((m for row in mass for m in row), zero)
    joint = [[m / total for m in row] for row in mass]
    p_task = [sum(row, zero) for row in joint]
    p_expert = [sum((joint[x][e] for x in range(num_tasks)), zero) for e in range(num_experts)]
    info = zero
    for x in range(num_tasks):
        for e in range(num_experts):
            if float(joint[x][e].detach()) > 0:  # 0 log 0 = 0
                info = info + joint[x][e] * torch.log(joint[x][e] / (p_task[x] * p_expert[e]))
    return -info


# ---------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------


def test_perfectly_separated_tasks_give_minus_log_2() -> None:
    # Task 0's tokens all on expert 0, task 1's on expert 1, equal mass: P = diag(1/2, 1/2),
    # P(t) = P(e) = 1/2, so I = 2 * 1/2 * log((1/2) / (1/4)) = log 2.
    probs_TE = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    task_ids_T = torch.tensor([0, 0, 1, 1])
    loss = mutual_information_loss(probs_TE, task_ids_T, num_tasks=2)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, torch.tensor(-math.log(2.0)), atol=1e-6, rtol=0)


def test_independent_routing_gives_zero() -> None:
    # Every token has the same distribution over experts, whatever its task: P(t, e) = P(t) P(e).
    probs_TE = torch.tensor([[0.3, 0.7]] * 5)
    task_ids_T = torch.tensor([0, 1, 1, 0, 1])
    loss = mutual_information_loss(probs_TE, task_ids_T, num_tasks=2)
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-6, rtol=0)


def test_lopsided_case_by_hand() -> None:
    # Task 0: tokens [0.8, 0.2] and [0.6, 0.4]; task 1: one token [0.1, 0.9].
    # M = [[1.4, 0.6], [0.1, 0.9]], sum 3, so P = [[7/15, 1/5], [1/30, 3/10]],
    # P(t) = [2/3, 1/3], P(e) = [1/2, 1/2], and P / (P(t) P(e)) = [[1.4, 0.6], [0.2, 1.8]]:
    # L = -(7/15 log 1.4 + 1/5 log 0.6 + 1/30 log 0.2 + 3/10 log 1.8) = -0.1775433...
    probs_TE = torch.tensor([[0.8, 0.2], [0.1, 0.9], [0.6, 0.4]])
    task_ids_T = torch.tensor([0, 1, 0])
    expected = -(7 / 15 * math.log(1.4) + 1 / 5 * math.log(0.6) + 1 / 30 * math.log(0.2) + 3 / 10 * math.log(1.8))
    assert expected == pytest.approx(-0.1775433, abs=1e-7)
    loss = mutual_information_loss(probs_TE, task_ids_T, num_tasks=2)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    mass = task_expert_mass(probs_TE, task_ids_T, num_tasks=2)
    torch.testing.assert_close(mass, torch.tensor([[1.4, 0.6], [0.1, 0.9]]))


def test_a_task_without_tokens_adds_nothing() -> None:
    # Task 2 of 3 has no tokens: its cells are empty and the loss equals the 2-task one.
    probs_TE = torch.tensor([[0.8, 0.2], [0.1, 0.9], [0.6, 0.4]])
    task_ids_T = torch.tensor([0, 1, 0])
    torch.testing.assert_close(
        mutual_information_loss(probs_TE, task_ids_T, num_tasks=3), mutual_information_loss(probs_TE, task_ids_T, 2)
    )


def test_empty_batch_returns_zero() -> None:
    probs_TE = torch.zeros(0, 4, requires_grad=True)
    loss = mutual_information_loss(probs_TE, torch.zeros(0, dtype=torch.int64), num_tasks=3)
    assert loss.shape == () and loss.dtype == torch.float32 and float(loss.detach()) == 0.0
    loss.backward()  # still part of the graph, so a summed training loss backpropagates
    assert probs_TE.grad.shape == (0, 4)


def test_bf16_probabilities_give_an_fp32_loss() -> None:
    probs_TE = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.bfloat16)
    loss = mutual_information_loss(probs_TE, torch.tensor([0, 1]), num_tasks=2)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(-math.log(2.0)), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Against the transcription: values and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, num_experts, num_tasks",
    [
        (1, 3, 1),  # T = 1, one task: I = 0
        (7, 5, 3),  # prime E, odd T
        (12, 4, 2),  # typical
        (9, 6, 4),  # E not a power of two, (likely) a task with few tokens
    ],
)
def test_matches_transcription_with_gradients(num_tokens, num_experts, num_tasks) -> None:
    torch.manual_seed(num_tokens * 31 + num_experts)
    logits_TE = (2.0 * torch.randn(num_tokens, num_experts)).requires_grad_()
    task_ids_T = torch.randint(0, num_tasks, (num_tokens,))
    loss = mutual_information_loss(torch.softmax(logits_TE, dim=-1), task_ids_T, num_tasks)
    (grad,) = torch.autograd.grad(loss, logits_TE)

    logits64 = logits_TE.detach().double().requires_grad_()
    expected = mi_loss_transcription(torch.softmax(logits64, dim=-1), task_ids_T, num_tasks)
    (grad64,) = torch.autograd.grad(expected, logits64)
    torch.testing.assert_close(loss.double(), expected.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad.double(), grad64, atol=1e-6, rtol=1e-5)


def test_minimising_the_loss_separates_tasks() -> None:
    # A few gradient steps on per-task logits must raise the mutual information (lower L).
    torch.manual_seed(0)
    task_logits_XE = (0.01 * torch.randn(2, 4)).requires_grad_()
    task_ids_T = torch.tensor([0, 1] * 8)
    opt = torch.optim.Adam([task_logits_XE], lr=0.2)
    losses = []
    for _ in range(30):
        loss = mutual_information_loss(torch.softmax(task_logits_XE[task_ids_T], -1), task_ids_T, 2)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Near uniform routing I is about 0; it approaches its bound H(task) = log 2 from above.
    assert losses[0] > -1e-3 and losses[-1] < -0.65
    assert min(losses) >= -math.log(2.0) - 1e-6


# ---------------------------------------------------------------------------------------------
# check_task_ids
# ---------------------------------------------------------------------------------------------


def test_check_task_ids_returns_int64() -> None:
    ids = check_task_ids(torch.tensor([0, 2, 1], dtype=torch.int32), 3, 3, "Gate")
    assert ids.dtype == torch.int64 and ids.tolist() == [0, 2, 1]
    assert check_task_ids(torch.zeros(0, dtype=torch.int64), 0, 2, "Gate").shape == (0,)


@pytest.mark.parametrize(
    "task_ids_T, match",
    [
        (None, r"MyGate needs RoutingContext.task_ids_T \(the task of each token\); got None"),
        (torch.zeros(2, 3, dtype=torch.int64),
         r"MyGate: task_ids_T has shape \(2, 3\): expected \(6,\), one id per token"),
        (torch.zeros(5, dtype=torch.int64), r"MyGate: task_ids_T has shape \(5,\): expected \(6,\)"),
        (torch.zeros(6), r"MyGate: task_ids_T has dtype torch.float32: expected an integer dtype"),
        (torch.zeros(6, dtype=torch.bool), r"MyGate: task_ids_T has dtype torch.bool: expected an integer dtype"),
        (torch.tensor([0, 1, 2, 3, 1, 0]), r"MyGate: task_ids_T has values in \[0, 3\]: allowed \[0, 2\] \(3 tasks\)"),
        (torch.tensor([0, -1, 2, 1, 1, 0]),
         r"MyGate: task_ids_T has values in \[-1, 2\]: allowed \[0, 2\] \(3 tasks\)"),
    ],
)
def test_check_task_ids_errors(task_ids_T, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_task_ids(task_ids_T, 6, 3, "MyGate")
