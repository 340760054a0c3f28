"""lightning_scaling.callbacks._common: the token rule (a training token is a non-padding input token:
attention_mask first; without one, right padding marked with -100 in ``labels`` (litgpt's SFT collate), or a
pad id the user names; labels also give the supervised tokens) and warnings said once, on rank zero."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import sft_collate, sft_rows

from lightning_scaling.callbacks import non_padding_tokens
from lightning_scaling.callbacks._common import (
    RULE_ALL,
    RULE_ATTENTION_MASK,
    RULE_LABELS,
    count_supervised_tokens,
    count_tokens,
    token_rule,
)


def test_right_padding_marked_in_labels_is_not_counted():
    rows = sft_rows(8)
    batch = sft_collate(rows)
    real = sum(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].numel() > real  # the batch really is padded
    assert count_tokens(batch) == real
    assert token_rule(batch) == RULE_LABELS
    # the prompt's -100 labels at the start are not padding: only the trailing run is
    assert int(count_supervised_tokens(batch)) == sum(int((r["labels"] != -100).sum()) for r in rows)


def test_mask_wins_and_no_marking_counts_every_element():
    ids = torch.randint(1, 9, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert count_tokens({"input_ids": ids, "attention_mask": mask, "labels": ids}) == 8
    assert token_rule({"input_ids": ids, "attention_mask": mask}) == RULE_ATTENTION_MASK
    assert count_tokens({"input_ids": ids}) == 10 and token_rule({"input_ids": ids}) == RULE_ALL


def test_pad_id_rule():
    ids = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]])
    fn = non_padding_tokens(0)
    assert int(fn({"input_ids": ids})) == 8
    assert "pad id 0" in token_rule({"input_ids": ids}, fn)
    with pytest.raises(ValueError, match="pad_token_id"):
        non_padding_tokens("0")


def test_warnings_only_on_rank_zero_and_once(monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    from lightning_scaling.callbacks._common import WarnOnce

    said = WarnOnce("TokenBudget")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        said.warn("key", "on rank one")
    assert caught == []
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    other = WarnOnce("TokenBudget")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert other.warn("key", "on rank zero") is True
        assert other.warn("key", "on rank zero") is False
    assert [str(w.message) for w in caught] == ["TokenBudget: on rank zero"]
