"""Fine-tuning data (docs/design.md §5.4): `longcat-lab synth` dialogues rendered with the chat template, tokenised
with a mask of the tokens the loss sees, cut into pieces that fit a row and packed into rows whose segment ids keep
dialogues apart.

- `load_records(data)`: a JSONL file of synth records (or a list of records) -> the checked records;
  `split_held_out(records, n)`: the n held-out dialogues (chosen by a hash of task_id, so stable) and the rest.
- `encode_dialogue(record, tokenizer) -> Dialogue`: the ids of `chat.template.render(messages, tools)`, encoded
  as one string exactly as a prompt is at inference (`chat.encode_chat`: only the template's markers are special
  tokens), and `trained`, True on every token of an assistant reply (its content, its tool-call blocks and its
  `</longcat_s>`); never on the system prompt, the tool descriptions, user turns, tool responses or the
  ` ASSISTANT:` prefix, which the prompt already holds.
- `split_pieces(dialogue, seq_len)`: consecutive pieces of at most seq_len + 1 tokens, each sharing its first
  token with the previous one's last, so every token after the first is a target exactly once; pieces without a
  trained target are dropped (they would cost compute and teach nothing).
- `pack(pieces, seq_len) -> PackedRows`: first-fit packing into rows of seq_len positions; `segment_ids` numbers
  the pieces of a row (padding: -1) and the targets are IGNORE_INDEX off the assistant tokens and on padding, so
  neither attention (`model.segment_mask`) nor the loss crosses a piece's boundary.
- `SFTSampler`: the trainer's batch source for fine-tuning: packed rows in a fresh order every epoch, and a
  stated fraction of rows drawn from the pre-training `MixtureSampler` against forgetting.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longcat_lab._util import check_int, is_number, shown
from longcat_lab.chat.template import ChatFormatError, render
from longcat_lab.chat.tokens import encode_chat
from longcat_lab.data.mixture import MixtureSampler
from longcat_lab.model.config import IGNORE_INDEX

PAD_SEGMENT = -1  # the segment id of padding positions (they see only each other, and carry no target)
# The longest JSONL line read: a synth record is a few thousand characters, and an unbounded line turns into an
# unbounded dialogue held (and tokenized) in memory.
LINE_LIMIT = 1_000_000


# Records ---------------------------------------------------------------------------------------------------------
def _check_function(entry: dict[str, Any], where: str) -> None:
    """The optional description and parameters of a tool spec, which the template writes out as text."""
    f = entry.get("function", entry)
    if isinstance(f, dict) and not isinstance(f.get("description"), (str, type(None))):
        raise ValueError(f"{where}.description={shown(f['description'])} is not allowed: it must be a string")
    if isinstance(f, dict) and not isinstance(f.get("parameters"), (dict, type(None))):
        raise ValueError(f"{where}.parameters={shown(f['parameters'])} is not allowed: it must be a JSON schema object")


def _check_record(record: Any, where: str) -> dict[str, Any]:
    """`record` if it renders (the template names what it refuses), else a ValueError naming `where` (file:line)."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError(f"{where} is not allowed: a record must be an object with a 'messages' list")
    tools = record.get("tools", [])
    if not isinstance(tools, list):
        raise ValueError(f"{where}.tools={shown(tools)} is not allowed: it must be a list of tool specs")
    for i, tool in enumerate(tools):
        if isinstance(tool, dict):
            _check_function(tool, f"{where}.tools[{i}]")
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict):
            raise ValueError(f"{where}.messages[{i}]={shown(m)} is not allowed: a message must be an object")
        if not isinstance(m.get("tool_calls"), (list, type(None))):
            raise ValueError(
                f"{where}.messages[{i}].tool_calls={shown(m['tool_calls'])} is not allowed: it must be a list"
            )
    if not any(m.get("role") == "assistant" for m in record["messages"]):
        raise ValueError(f"{where} is not allowed: it has no assistant message, so nothing to learn")
    try:
        render(record["messages"], tools or None, add_generation_prompt=False)
    except ChatFormatError as err:
        raise ValueError(f"{where}: {err}") from None
    try:  # JSON may escape a lone surrogate (\ud800), which no tokenizer or UTF-8 file can hold
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} is not allowed: it holds a lone surrogate (an escape such as \\ud800)") from None
    return record


def load_records(data: str | os.PathLike | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of a JSONL file (one `longcat-lab synth` record per line) or of a list, each checked (a
    'messages' list with an assistant message, an optional 'tools' list); ValueError naming the line otherwise."""
    if isinstance(data, list):
        records = [_check_record(r, f"records[{i}]") for i, r in enumerate(data)]
    else:
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"data={str(data)!r} is not allowed: no such file (expected a JSONL of synth records)")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line} is not allowed: not UTF-8 text") from None
        records = []
        # Lines end at "\n" only: str.splitlines would also cut at U+2028 and others, which JSON strings may hold.
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            if len(line) > LINE_LIMIT:
                raise ValueError(
                    f"{path}:{n} is not allowed: the line has {len(line):,} characters; a record may have at most "
                    f"{LINE_LIMIT:,}"
                )
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not allowed: not JSON ({err.msg})") from None
            except (ValueError, RecursionError):  # an int of over 4300 digits; hostile nesting
                raise ValueError(
                    f"{path}:{n} is not allowed: not JSON that Python reads (too long or too deep)"
                ) from None
            records.append(_check_record(record, f"{path}:{n}"))
    if not records:
        raise ValueError(f"data={data if not isinstance(data, list) else '[]'!r} is not allowed: it holds no records")
    return records


def records_digest(records: list[dict[str, Any]]) -> str:
    """sha256 of the records' canonical JSON: what a resumed fine-tuning run checks it trains on."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def split_held_out(records: list[dict[str, Any]], n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held_out): the n records whose task_id (else their JSON) hashes lowest are held out, so the split
    does not depend on the file's order and grows by adding records. At least one record is kept for training."""
    check_int("held-out dialogues", n, 0)
    if n >= len(records):
        raise ValueError(
            f"sft_val_dialogues={n} is not allowed: it must be below the number of records ({len(records)})"
        )

    def key(r: dict[str, Any]) -> str:
        name = r.get("task_id") if isinstance(r.get("task_id"), str) else json.dumps(r, sort_keys=True)
        return hashlib.sha1(name.encode()).hexdigest()

    order = sorted(range(len(records)), key=lambda i: key(records[i]))
    held = set(order[:n])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


# Rendering and the loss mask ---------------------------------------------------------------------------------
@dataclass
class Dialogue:
    """One rendered dialogue: token ids and, per token, whether the loss trains it (an assistant token)."""

    ids: np.ndarray  # [n] int64
    trained: np.ndarray  # [n] bool
    task_id: str = ""


def assistant_spans(messages: list[dict], tools: list[dict] | None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered dialogue and the [start, end) character span of every assistant reply in it: from after the
    ` ASSISTANT:` prefix through its `</longcat_s>`. Rendering a prefix of the messages gives a prefix of the
    text (render appends message by message after the tool block), which is what places each reply; both facts
    are checked, so a template that breaks them fails here rather than mislabelling tokens."""
    text = render(messages, tools, add_generation_prompt=False)
    head = render([], tools, add_generation_prompt=False)  # the tool block: rendered once, not once per reply
    body = render(messages, None, add_generation_prompt=False)
    if text != head + body:
        raise ValueError("the chat template did not render the tool block as a prefix of the dialogue")
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = render(messages[:i], None, add_generation_prompt=True)
        upto = render(messages[: i + 1], None, add_generation_prompt=False)
        if not body.startswith(upto) or not upto.startswith(before):
            raise ValueError(f"messages[{i}]: the chat template did not render the dialogue message by message")
        spans.append((len(head) + len(before), len(head) + len(upto)))
    return text, spans


def encode_dialogue(record: dict[str, Any], tokenizer) -> Dialogue:
    """The record's rendered dialogue as token ids (the whole string encoded at once, as a prompt at inference) and
    the trained mask: a token is trained when its characters overlap an assistant reply."""
    text, spans = assistant_spans(record["messages"], record.get("tools") or None)
    enc = encode_chat(tokenizer, text)  # a marker typed in a message stays plain text, as in a served prompt
    ids = np.asarray(enc.ids, dtype=np.int64)
    trained = np.zeros(len(ids), dtype=bool)
    starts = np.asarray([a for a, _ in enc.offsets])
    ends = np.asarray([b for _, b in enc.offsets])
    for a, b in spans:
        trained |= (starts < b) & (ends > a)
    return Dialogue(ids, trained, str(record.get("task_id", "")))


# Pieces and packing ------------------------------------------------------------------------------------------
def split_pieces(dialogue: Dialogue, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, trained) pieces of at most seq_len + 1 tokens; piece k+1 starts at piece k's last token, so every
    token but the first is one piece's target exactly once. Pieces with no trained target are dropped."""
    check_int("seq_len", seq_len, 1)
    n, out = len(dialogue.ids), []
    for start in range(0, max(n - 1, 0), seq_len):
        end = min(start + seq_len + 1, n)
        if dialogue.trained[start + 1 : end].any():
            out.append((dialogue.ids[start:end], dialogue.trained[start:end]))
    return out


@dataclass
class PackedRows:
    """Rows ready for the model: inputs, targets (IGNORE_INDEX where untrained) and segment ids, each [R, seq_len]."""

    x: torch.Tensor
    y: torch.Tensor
    segment_ids: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def targets(self) -> int:
        """Tokens the loss sees."""
        return int((self.y != IGNORE_INDEX).sum())


# First-fit looks for room among this many of the newest rows: packing stays linear in the number of pieces, and
# most pieces are whole rows anyway (only a dialogue's last piece is short).
_OPEN_ROWS = 64


def pack(pieces: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int = 0) -> PackedRows:
    """Pack pieces (in the given order) into rows of seq_len positions, each piece into the first of the newest
    open rows with room. A piece of k + 1 tokens fills k positions: inputs ids[:-1], targets ids[1:] where
    trained, else IGNORE_INDEX. Padding: `pad_id` inputs, segment PAD_SEGMENT, no target."""
    check_int("seq_len", seq_len, 1)
    rows: list[list[int]] = []  # the piece indices of each row
    room: list[int] = []
    for p, (ids, _) in enumerate(pieces):
        k = len(ids) - 1
        if not 1 <= k <= seq_len:
            raise ValueError(f"pieces[{p}] has {len(ids)} tokens: it must have 2 to seq_len + 1 = {seq_len + 1}")
        first = max(0, len(rows) - _OPEN_ROWS)
        r = next((r for r in range(first, len(rows)) if room[r] >= k), None)
        if r is None:
            rows.append([])
            room.append(seq_len)
            r = len(rows) - 1
        rows[r].append(p)
        room[r] -= k
    x = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    y = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    seg = np.full((len(rows), seq_len), PAD_SEGMENT, dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for s, p in enumerate(members):
            ids, trained = pieces[p]
            k = len(ids) - 1
            x[r, at : at + k] = ids[:-1]
            y[r, at : at + k] = np.where(trained[1:], ids[1:], IGNORE_INDEX)
            seg[r, at : at + k] = s
            at += k
    return PackedRows(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(seg))


def pack_dialogues(dialogues: list[Dialogue], seq_len: int, pad_id: int = 0) -> PackedRows:
    """Every piece of `dialogues`, in order, packed (what the held-out loss is measured on)."""
    return pack([p for d in dialogues for p in split_pieces(d, seq_len)], seq_len, pad_id)


# The sampler -------------------------------------------------------------------------------------------------
# Ratios are held as millionths so that the count of pre-training rows is exact integer arithmetic.
_RATIO_SCALE = 1_000_000


class SFTSampler:
    """The trainer's batch source for fine-tuning (`Trainer.build_sampler`): `batch(mixture, batch_size, seq_len)`
    -> (x, y, segment_ids). Of every batch, the rows that bring the running count of pre-training rows to
    floor(pretrain_ratio * rows so far) are windows from `pretrain` (the given mixture, segment 0 throughout, as in
    pre-training); the others are packed dialogue rows. Each epoch packs the pieces in an order drawn from
    (seed, epoch), so the data position is (epoch, row, counters, the pre-training sampler's state)."""

    def __init__(
        self, dialogues: list[Dialogue], pretrain: MixtureSampler | None, pretrain_ratio: float, seed: int, pad_id: int
    ):
        if not is_number(pretrain_ratio) or not 0 <= pretrain_ratio < 1:
            raise ValueError(f"sft_pretrain_ratio={pretrain_ratio!r} is not allowed: it must be a number in [0, 1)")
        if pretrain_ratio > 0 and pretrain is None:
            raise ValueError("sft_pretrain_ratio > 0 needs a pre-training sampler")
        if not dialogues:
            raise ValueError("dialogues=[] is not allowed: fine-tuning needs at least one dialogue")
        self.dialogues, self.pretrain, self.seed, self.pad_id = dialogues, pretrain, seed, pad_id
        self.ratio = round(pretrain_ratio * _RATIO_SCALE)
        self.epoch = self.row = 0
        self.counts = {"rows": 0, "pretrain_rows": 0, "sft_rows": 0, "sft_targets": 0}
        self._rows: PackedRows | None = None
        self._rows_key: tuple[int, int] | None = None

    def epoch_rows(self, epoch: int, seq_len: int) -> PackedRows:
        """The packed rows of an epoch: the pieces of every dialogue in an order drawn from (seed, epoch)."""
        if self._rows_key != (epoch, seq_len):
            pieces = [p for d in self.dialogues for p in split_pieces(d, seq_len)]
            if not pieces:
                raise ValueError(f"seq_len={seq_len}: no dialogue has a trained token")
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            order = torch.randperm(len(pieces), generator=g).tolist()
            self._rows = pack([pieces[i] for i in order], seq_len, self.pad_id)
            self._rows_key = (epoch, seq_len)
        return self._rows

    def batch(
        self, mixture: dict[str, float], batch_size: int, seq_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, segment_ids), each [batch_size, seq_len] int64; pre-training rows come last."""
        done = self.counts["rows"]
        n_pre = ((done + batch_size) * self.ratio) // _RATIO_SCALE - (done * self.ratio) // _RATIO_SCALE
        xs, ys, segs = [], [], []
        for _ in range(batch_size - n_pre):
            rows = self.epoch_rows(self.epoch, seq_len)
            xs.append(rows.x[self.row])
            ys.append(rows.y[self.row])
            segs.append(rows.segment_ids[self.row])
            self.row += 1
            if self.row == len(rows):
                self.epoch, self.row = self.epoch + 1, 0
        x, y, seg = torch.stack(xs), torch.stack(ys), torch.stack(segs)
        self.counts["sft_targets"] += int((y != IGNORE_INDEX).sum())
        if n_pre:
            px, py = self.pretrain.batch(mixture, n_pre, seq_len)
            x, y = torch.cat([x, px]), torch.cat([y, py])
            seg = torch.cat([seg, torch.zeros_like(px)])
        self.counts["rows"] += batch_size
        self.counts["pretrain_rows"] += n_pre
        self.counts["sft_rows"] += batch_size - n_pre
        return x, y, seg

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "row": self.row,
            "counts": dict(self.counts),
            "pretrain": self.pretrain.state_dict() if self.pretrain is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"epoch", "row", "counts", "pretrain"}:
            raise ValueError(f"sampler state has keys {sorted(state)}: not a fine-tuning sampler's state")
        self.epoch, self.row, self.counts = int(state["epoch"]), int(state["row"]), dict(state["counts"])
        if self.pretrain is not None and state["pretrain"] is not None:
            self.pretrain.load_state_dict(state["pretrain"])


__all__ = [
    "PAD_SEGMENT",
    "LINE_LIMIT",
    "Dialogue",
    "PackedRows",
    "SFTSampler",
    "assistant_spans",
    "encode_dialogue",
    "load_records",
    "pack",
    "pack_dialogues",
    "records_digest",
    "split_held_out",
    "split_pieces",
]
