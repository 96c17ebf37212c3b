"""Measuring a model beyond its validation loss (docs/design.md §3.5): bits per byte next to the unigram baseline
and gzip/lzma (`bpb`), arithmetic exact match and cheap code metrics on held-out documents (`tasks`), the routing
summary (`routing`), whether the model copies a span it has seen (`copying`), the evaluator that runs them on a
checkpoint (`suite`, `longcat-lab eval`), and the published scores of the 560B model as data (`published`)."""

from longcat_lab.eval.bpb import BitsPerByte, bits, bits_per_byte, compressed_bits, token_byte_lengths
from longcat_lab.eval.copying import copy_score, format_copying
from longcat_lab.eval.published import published_note, published_scores
from longcat_lab.eval.routing import routing_summary
from longcat_lab.eval.suite import EVAL_FILE, evaluate_checkpoint, evaluate_model, format_table
from longcat_lab.eval.tasks import arithmetic, code, heldout_documents

__all__ = [
    "BitsPerByte",
    "bits",
    "bits_per_byte",
    "compressed_bits",
    "token_byte_lengths",
    "copy_score",
    "format_copying",
    "published_note",
    "published_scores",
    "routing_summary",
    "EVAL_FILE",
    "evaluate_checkpoint",
    "evaluate_model",
    "format_table",
    "arithmetic",
    "code",
    "heldout_documents",
]
