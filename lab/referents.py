"""Auxiliary "which slot?" losses on the pooled cell clues (training only, `--referent-loss`).

The answer-token loss teaches binding ("the red square" -> the cell that holds it) only through
the reply's first tokens, and the 81.0% release missed it on its own training turns (is
there 68%, did the X make a sound 63%, where is 81%). These losses say it directly, per slot
column of the pooled cell clues the LM reads (`Prefix.cells`):
- referent: the slot the question points at (the named slot, the named object's slot, or none:
  "Is there a blue circle?" where there is none); only for questions that name something;
- sound: the slot of the object that beeped (none in a silent scene); every turn.
The heads are thrown away after training; the model keeps what the clues learnt to carry.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from demo import world as W
from fusion.layers import column_means
from .trainset import words_of

N_SLOTS = len(W.SLOTS)


def referent_targets(turn: W.TurnSpec) -> torch.Tensor:
    """(2 * N_SLOTS + 1,) float: referent per slot, sound per slot, referent valid (0/1)."""
    words = words_of(turn.question.text)
    colour = next((w for w in words if w in W.COLORS), None)
    shape = next((w for w in words if w in W.SHAPES), None)
    slot = next((w for w in words if w in W.SLOTS), None)
    ref = [0.0] * N_SLOTS
    valid = slot is not None or shape is not None
    if slot is not None:
        ref[W.SLOTS.index(slot)] = 1.0
    elif shape is not None:
        for o in turn.scene.objects:
            if o.shape == shape and colour in (None, o.color):
                ref[W.SLOTS.index(o.slot)] = 1.0
    snd = [0.0] * N_SLOTS
    if turn.scene.sound_slot is not None:
        snd[W.SLOTS.index(turn.scene.sound_slot)] = 1.0
    return torch.tensor(ref + snd + [float(valid)])


class ReferentProbe(nn.Module):
    """Two logits per slot column (referent, sound) from the column's mean cell clue."""

    def __init__(self, d: int, grid: tuple[int, int]):
        super().__init__()
        assert grid[0] == N_SLOTS, ("one token column per slot", grid)
        self.rows = grid[1]
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2))

    def forward(self, cells: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        # cells (B, rows * cols, D); targets (B, 2 * N_SLOTS + 1) from referent_targets
        cols = column_means(cells.float(), self.rows)                           # (B, 3, D)
        logits = self.head(cols)                                                # (B, 3, 2)
        ref, snd, valid = targets[:, :N_SLOTS], targets[:, N_SLOTS:-1], targets[:, -1]
        l_ref = F.binary_cross_entropy_with_logits(logits[..., 0], ref, reduction="none").mean(1)
        l_ref = (l_ref * valid).sum() / valid.sum().clamp(min=1)
        l_snd = F.binary_cross_entropy_with_logits(logits[..., 1], snd)
        return {"referent": l_ref, "sound": l_snd}
