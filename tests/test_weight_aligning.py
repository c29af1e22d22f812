"""Weight aligning (`fedavg_replay_wa`): new-class head rows rescaled to the old rows' norm."""

import torch

from fedfmx.learner.methods import align_weights


def test_hand_computed_alignment() -> None:
    # old rows: norms 5 and 1 (mean 3); new rows: norms 2 and 10 (mean 6) -> γ = 1/2
    head = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [6.0, 8.0]])
    aligned = align_weights(head, torch.tensor([2, 3]))
    torch.testing.assert_close(
        aligned, torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 1.0], [3.0, 4.0]])
    )


def test_nothing_to_align_without_old_or_new_rows() -> None:
    head = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert torch.equal(align_weights(head, torch.tensor([0, 1])), head)
    assert torch.equal(align_weights(head, torch.tensor([], dtype=torch.long)), head)
