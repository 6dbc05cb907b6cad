"""Training data: read documents, tokenise, pack into fixed-length rows with segment ids, iterate.

* Documents come from .txt (one document per file), .jsonl (one per line, field `text`) or .parquet (column
  `text`) files, optionally .gz / .xz / .bz2 compressed, or from directories of them, all read by the one
  reader in qwen_jax.files (one-line errors naming file, line and byte offset).
* Each document is tokenised, ends with the end-of-text token, and is packed back to back into rows of
  `seq_len + 1` tokens. A row's segment ids mark the documents, so attention never crosses a boundary and
  no target is predicted across one.
* `PackedDataset.batches` shuffles rows deterministically from (seed, epoch). Its position, {"epoch",
  "index"}, is saved in every checkpoint, so a resumed run sees exactly the data it would have seen.

The packed corpus is held in memory as int32 arrays (4 bytes per token): fine up to a few hundred
million tokens per host.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterator

import numpy as np

from kernels.util import cdiv
from qwen_jax.errors import DataError
from qwen_jax.files import check_text, iter_jsonl, kind, read_parquet_column, read_text

DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "shakespeare.jsonl.xz")
_KINDS = (".txt", ".jsonl", ".json", ".parquet")


def _expand(paths: list[str]) -> list[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                files += [os.path.join(root, n) for n in sorted(names) if kind(n)[0] in _KINDS]
        elif os.path.exists(p):
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not files:
        raise DataError(f"no .txt/.jsonl/.parquet files found in {', '.join(paths)}")
    return files


def read_documents(paths: list[str] | str, text_field: str = "text",
                   warn: Callable[[str], None] | None = None) -> list[str]:
    """All non-empty documents from files or directories, in a stable order. Every file goes through the
    one reader (qwen_jax.files); a document that is not text is refused; exact duplicates are kept and
    counted in one warning."""
    docs: list[str] = []
    where: list[str] = []
    for path in _expand([paths] if isinstance(paths, str) else list(paths)):
        ext = kind(path)[0]
        if ext == ".txt":
            docs.append(read_text(path))
            where.append(path)
        elif ext in (".jsonl", ".json"):
            for n, obj in iter_jsonl(path):
                if not isinstance(obj.get(text_field), str):
                    raise DataError(f"{path}:{n}: expected an object with a string field {text_field!r}")
                docs.append(obj[text_field])
                where.append(f"{path}:{n}")
        elif ext == ".parquet":
            for i, t in enumerate(read_parquet_column(path, text_field)):
                if isinstance(t, str):
                    docs.append(t)
                    where.append(f"{path} row {i}")
        else:
            raise DataError(f"{path}: unsupported file type (use .txt, .jsonl or .parquet, optionally .gz/.xz/.bz2)")
    kept = [(d, w) for d, w in zip(docs, where) if d.strip()]
    if not kept:
        raise DataError(f"no non-empty documents in {paths}")
    seen: dict[bytes, str] = {}
    duplicates = []
    for d, w in kept:
        check_text(d, w)
        h = hashlib.blake2b(d.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if h in seen:
            duplicates.append((w, seen[h]))
        else:
            seen[h] = w
    if duplicates and warn is not None:
        w, first = duplicates[0]
        warn(f"warning: {len(duplicates)} of {len(kept)} documents are exact duplicates of earlier ones (first: "
             f"{w}, same as {first}); they are kept")
    return [d for d, _ in kept]


def tokenize_documents(tokenizer, docs: list[str], eos_id: int) -> list[np.ndarray]:
    """Token ids per document, each ending with `eos_id`."""
    hf = tokenizer.hf if hasattr(tokenizer, "hf") else tokenizer
    ids = hf(docs, add_special_tokens=False)["input_ids"]
    return [np.asarray(list(x) + [eos_id], np.int32) for x in ids]


def split_holdout(docs: list[np.ndarray], fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out `fraction` of the tokens for evaluation.

    With many documents, whole documents are held out (a seeded choice); with few (e.g. 42 plays), the last
    `fraction` of every document is, so the evaluation covers all of them."""
    if fraction <= 0:
        return docs, []
    if len(docs) >= 50:
        held = holdout_indices(len(docs), fraction, seed)
        return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]
    train, evals = [], []
    for d in docs:
        cut = len(d) - int(len(d) * fraction)
        train.append(d[:cut])
        if cut < len(d):
            evals.append(d[cut:])
    return train, evals


def holdout_indices(n: int, fraction: float, seed: int) -> set[int]:
    """A seeded choice of round(fraction * n) items to hold out: at least 1, and at least 1 left to train."""
    n_eval = min(n - 1, max(1, int(round(fraction * n))))
    return set(np.random.default_rng(seed).choice(n, n_eval, replace=False).tolist())


def pack(docs: list[np.ndarray], row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents and cut into rows [N, row_len]; segment ids [N, row_len] start at 1 and change
    at every document boundary (a document split across rows keeps its id in both)."""
    if not docs:
        return np.zeros((0, row_len), np.int32), np.zeros((0, row_len), np.int32)
    tokens = np.concatenate(docs)
    seg = np.repeat(np.arange(1, len(docs) + 1, dtype=np.int64), [len(d) for d in docs])
    n = len(tokens) // row_len
    seg = (seg - 1) % (2**31 - 2) + 1
    return tokens[: n * row_len].reshape(n, row_len), seg[: n * row_len].reshape(n, row_len).astype(np.int32)


def shuffled_batches(n: int, batch_size: int, seed: int, state: dict | None = None):
    """Endless (sorted item indices, batch number, state after this batch): items [0, n) shuffled per epoch
    from (seed, epoch), each epoch's last partial batch dropped. `state` = {"epoch", "index"} resumes
    exactly; the batch number counts batches from the start of the run."""
    epoch, index = (state["epoch"], state["index"]) if state else (0, 0)
    per_epoch = n // batch_size
    while True:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        while index < per_epoch:
            rows = np.sort(perm[index * batch_size:(index + 1) * batch_size])
            number = epoch * per_epoch + index
            index += 1
            nxt = {"epoch": epoch, "index": index} if index < per_epoch else {"epoch": epoch + 1, "index": 0}
            yield rows, number, nxt
        epoch, index = epoch + 1, 0


class RowDataset:
    """Named arrays sharing a leading row axis (e.g. tokens [N, T+1], segment_ids [N, T+1], loss_mask ...)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        lens = {k: len(v) for k, v in arrays.items()}
        if len(set(lens.values())) > 1:
            raise ValueError(f"arrays disagree on the number of rows: {lens}")
        self.arrays = dict(arrays)

    def __len__(self) -> int:
        return len(self.arrays["tokens"])

    @property
    def tokens(self) -> np.ndarray:
        return self.arrays["tokens"]

    @property
    def segment_ids(self) -> np.ndarray:
        return self.arrays["segment_ids"]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def _rows(self, rows) -> dict[str, np.ndarray]:
        return {k: v[rows] for k, v in self.arrays.items()}

    def check_batch(self, batch_size: int) -> "RowDataset":
        """DataError unless the dataset holds at least one batch."""
        if len(self) < batch_size:
            raise DataError(f"dataset has {len(self)} rows of {self.tokens.shape[-1]} tokens, fewer than one "
                            f"batch of {batch_size}; use more data, a smaller --batch-size or --seq-len")
        return self

    def batches(self, batch_size: int, seed: int, state: dict | None = None) -> Iterator[tuple[dict, dict]]:
        """Endless (batch, state-after-this-batch) pairs: rows shuffled per epoch from (seed, epoch).

        Drops each epoch's last partial batch. `state` = {"epoch", "index"} resumes exactly."""
        self.check_batch(batch_size)
        for rows, _, nxt in shuffled_batches(len(self), batch_size, seed, state):
            yield self._rows(rows), nxt

    def sequential(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict]:
        """Unshuffled batches for evaluation. A partial last batch is padded with all-zero rows (segment id 0:
        no loss, no weight), so every row is evaluated and the batch shape stays fixed."""
        n = cdiv(len(self), batch_size)
        for i in range(n if max_batches is None else min(n, max_batches)):
            batch = self._rows(slice(i * batch_size, (i + 1) * batch_size))
            short = batch_size - len(batch["tokens"])
            if short:
                batch = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
            yield batch


class PackedDataset(RowDataset):
    """Packed language-model rows: tokens, segment_ids [N, seq_len + 1] and, for SFT, a loss_mask."""

    def __init__(self, tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray | None = None):
        arrays = {"tokens": tokens, "segment_ids": segment_ids}
        if loss_mask is not None:
            arrays["loss_mask"] = loss_mask
        super().__init__(arrays)


def build_datasets(tokenizer, paths, seq_len: int, eval_fraction: float, seed: int, eos_id: int,
                   text_field: str = "text") -> tuple[PackedDataset, PackedDataset]:
    docs = tokenize_documents(tokenizer, read_documents(paths, text_field), eos_id)
    train_docs, eval_docs = split_holdout(docs, eval_fraction, seed)
    return PackedDataset(*pack(train_docs, seq_len + 1)), PackedDataset(*pack(eval_docs, seq_len + 1))


def unigram_entropy(ds: PackedDataset, vocab_size: int) -> float:
    """Entropy (nats) of the corpus's token frequencies: the loss of the best context-free model."""
    counts = np.bincount(ds.tokens.reshape(-1), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------ tokenizer training
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
                       "</tool_call>", "<tool_response>", "</tool_response>"]
# Qwen2/3's pre-tokenisation split (letters, single digits, punctuation runs, newlines, spaces).
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def train_bpe_tokenizer(docs: list[str], vocab_size: int, out_dir: str | None = None):
    """A byte-level BPE tokenizer in Qwen's style (same split regex, special tokens and chat template).

    Returns a `qwen_jax.Tokenizer`; saved to out_dir when given."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qwen_jax.tokenizer import Tokenizer as QTokenizer, qwen3_chat_template

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=QWEN_SPECIAL_TOKENS[1:])
    fast.chat_template = qwen3_chat_template()
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return QTokenizer(fast)
