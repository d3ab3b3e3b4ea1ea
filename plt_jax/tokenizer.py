"""Tokenizers: byte-level, byte-level BPE trained on the corpus, or any HF tokenizer.json.

Every kind is a `tokenizers.Tokenizer` underneath, so `save_pretrained` writes a folder that
`transformers.AutoTokenizer` loads as it is: the exported model carries its tokenizer.

Ids for the `byte` and `bpe` kinds: `<pad>`=0, `<s>`=1, `</s>`=2; the `byte` kind maps byte b to
id b + 3 (vocab 259). Our `encode` never adds special tokens and treats a literal "</s>" in the
text as plain text, so documents cannot smuggle control tokens in and decode(encode(t)) == t.
The saved tokenizer.json prepends `<s>` when a Hugging Face user calls `tokenizer(text)`,
matching how documents were packed for training.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from plt_jax import fileio

PAD, BOS, EOS = '<pad>', '<s>', '</s>'
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 for the byte and bpe kinds
KINDS = ('bpe', 'byte', 'hf')
# How a saved tokenizer folder was made; checked on reuse, and written last, so its presence
# means the folder is complete.
META_FILE = 'plt_tokenizer.json'
_META_FILE = META_FILE

# Names tried, in order, when an HF tokenizer.json comes without a tokenizer_config.json.
_BOS_GUESSES = ('<s>', '<|begin_of_text|>', '<bos>', '<|endoftext|>', '[CLS]')
_EOS_GUESSES = ('</s>', '<|end_of_text|>', '<eos>', '<|endoftext|>', '<|im_end|>', '[SEP]')
_PAD_GUESSES = ('<pad>', '[PAD]', '<|pad|>', '<|finetune_right_pad_id|>')


def _bytes_to_unicode() -> dict[int, str]:
  """The byte -> printable-character table of byte-level BPE (printable bytes map to themselves)."""
  printable = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _byte_level_pipeline(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  bos_id = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(
      single=f'{BOS} $A', pair=f'{BOS} $A {BOS} $B', special_tokens=[(BOS, bos_id)])
  return tok


def make_byte_tokenizer() -> tokenizers.Tokenizer:
  """256 byte tokens (id = byte + 3) after the 3 special tokens; nothing to train."""
  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
  for b, ch in _bytes_to_unicode().items():
    vocab[ch] = b + len(SPECIAL_TOKENS)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return _byte_level_pipeline(tok)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
  """Byte-level BPE: every byte is in the base alphabet, so no text is ever unknown."""
  floor = 256 + len(SPECIAL_TOKENS)
  if vocab_size <= floor:
    raise ValueError(f'bpe vocab_size must exceed {floor} (256 bytes + 3 special tokens), '
                     f'got {vocab_size}; use tokenizer="byte" for a pure byte vocabulary')
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  return _byte_level_pipeline(tok)


def _token_content(value) -> str | None:
  """tokenizer_config.json stores special tokens as a string or as {'content': ...}."""
  if isinstance(value, dict):
    value = value.get('content')
  return value if isinstance(value, str) and value else None


class Tokenizer:
  """Thin wrapper over `tokenizers.Tokenizer` that knows its bos/eos/pad ids."""

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str, eos_token: str,
               pad_token: str, source: str = '<memory>'):
    self.backend = backend
    self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
    ids = []
    for role, token in (('bos', bos_token), ('eos', eos_token), ('pad', pad_token)):
      tid = backend.token_to_id(token)
      if tid is None:
        raise ValueError(f'{source}: {role} token {token!r} is not in the vocabulary')
      ids.append(tid)
    self.bos_id, self.eos_id, self.pad_id = ids
    # Exact vocabulary size including added tokens; every id we emit is < vocab_size.
    self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
    # Literal special-token strings inside documents stay plain text (not serialised to JSON).
    self.backend.encode_special_tokens = True
    self._token_bytes = None

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                               skip_special_tokens=skip_special_tokens)

  @property
  def sha256(self) -> str:
    """Identity of the tokenizer (vocabulary, merges, pipeline and special roles)."""
    h = hashlib.sha256(self.backend.to_str().encode())
    h.update(f'|{self.bos_token}|{self.eos_token}|{self.pad_token}'.encode())
    return h.hexdigest()

  @property
  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for special tokens), int32 [vocab_size].

    Summing it over the predicted targets gives the byte count for bits-per-byte. Exact for
    byte-level tokenizers (byte, bpe, GPT-2 style hf); for other hf tokenizers it is the length
    of each token decoded alone, which can miss e.g. SentencePiece's leading spaces.
    """
    if self._token_bytes is None:
      out = np.zeros(self.vocab_size, np.int32)
      special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
      if isinstance(self.backend.decoder, decoders.ByteLevel):
        char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        for token, tid in self.backend.get_vocab(with_added_tokens=True).items():
          if token in special:
            continue
          if all(c in char_to_byte for c in token):
            out[tid] = len(token)
          else:  # an added non-byte-level token: count its text
            out[tid] = len(token.encode('utf-8'))
      else:
        for tid in range(self.vocab_size):
          tok = self.backend.id_to_token(tid)
          if tok is not None and tok not in special:
            out[tid] = len(self.backend.decode([tid], skip_special_tokens=True).encode('utf-8'))
      self._token_bytes = out
    return self._token_bytes

  def save_pretrained(self, directory: str) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    folder = fileio.path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    fileio.write_text(folder / 'tokenizer.json', self.backend.to_str(pretty=True))
    special = {'bos_token': self.bos_token, 'eos_token': self.eos_token,
               'pad_token': self.pad_token}
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', **special,
              # Code has ' .' and ' ,' that HF's default clean-up would rewrite.
              'clean_up_tokenization_spaces': False}
    for name, obj in (('tokenizer_config.json', config), ('special_tokens_map.json', special)):
      fileio.write_json(folder / name, obj)

  @classmethod
  def from_pretrained(cls, directory_or_tokenizer_json: str) -> 'Tokenizer':
    """Loads a folder (or its tokenizer.json); special roles come from the config files there."""
    path = fileio.path(directory_or_tokenizer_json)
    if path.is_dir():
      directory, file = path, path / 'tokenizer.json'
    else:
      directory, file = path.parent, path
    if not file.is_file():
      raise ValueError(f'no tokenizer.json at {file}')
    try:
      backend = tokenizers.Tokenizer.from_str(file.read_text())
    except Exception as e:  # the Rust side raises a bare Exception
      raise ValueError(f'{file}: not a valid tokenizer.json ({e})') from e
    roles = {}
    for name in ('special_tokens_map.json', 'tokenizer_config.json'):
      config_path = directory / name
      if config_path.is_file():
        config = fileio.read_json(config_path)
        for role in ('bos_token', 'eos_token', 'pad_token'):
          if role not in roles and _token_content(config.get(role)):
            roles[role] = _token_content(config.get(role))
    vocab = backend.get_vocab(with_added_tokens=True)
    for role, guesses in (('bos_token', _BOS_GUESSES), ('eos_token', _EOS_GUESSES),
                          ('pad_token', _PAD_GUESSES)):
      if role not in roles:
        found = next((g for g in guesses if g in vocab), None)
        if found is not None:
          roles[role] = found
    if 'eos_token' not in roles:
      raise ValueError(f'{file}: cannot tell which token is eos; add a tokenizer_config.json '
                       f'with "eos_token" next to it')
    roles.setdefault('bos_token', roles['eos_token'])  # GPT-2 style: one token for both
    roles.setdefault('pad_token', roles['eos_token'])  # padding is always masked anyway
    return cls(backend, source=os.fspath(file), **roles)


def read_meta(directory) -> Optional[dict]:
  """The record `save_folder` wrote into a tokenizer folder, or None when there is none."""
  p = fileio.path(directory) / META_FILE
  return fileio.read_json(p) if p.is_file() else None


def save_folder(tok: Tokenizer, directory, meta: dict) -> None:
  """Writes a tokenizer folder: the Hugging Face files and META_FILE (`meta` with the
  tokenizer's sha256 and exact vocabulary size added). The one writer of tokenizer folders.

  A local folder is written aside and renamed, so a process sharing it never reads half a
  folder; when another process renamed its copy first, that copy stays (a caller checks its
  sha256). A remote folder is written file by file with META_FILE last, so readers wait for it.
  """
  folder = fileio.path(directory)
  record = {**meta, 'vocab_size_actual': tok.vocab_size, 'sha256': tok.sha256}
  if fileio.is_remote(folder):
    tok.save_pretrained(folder)
    fileio.write_json(folder / META_FILE, record)
    return
  tmp = f'{os.fspath(folder)}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  tok.save_pretrained(tmp)
  fileio.write_json(os.path.join(tmp, META_FILE), record)
  folder.parent.mkdir(parents=True, exist_ok=True)
  try:
    os.replace(tmp, folder)
  except OSError:  # another process got there first
    shutil.rmtree(tmp, ignore_errors=True)


def _meta_matches(meta: dict, want: dict) -> list[str]:
  return [f'{k}: saved {meta.get(k)!r}, asked {v!r}' for k, v in want.items() if meta.get(k) != v]


def build_tokenizer(kind: str, *, workdir: str | None,
                    train_texts: Iterable[str] | Callable[[], Iterable[str]] | None = None,
                    vocab_size: int | None = None, path: str | None = None) -> Tokenizer:
  """Returns the run's tokenizer, reusing `workdir/tokenizer` when it is already there.

  The workdir copy is what the run trains with and what export ships, so a resumed run keeps
  its tokenizer even if the corpus changed. Asking for a different kind or bpe vocab size
  for an existing workdir is an error rather than a silent retrain. `train_texts` (only read
  for bpe) may be a zero-argument callable so the corpus is not read when reuse is possible.
  """
  if kind not in KINDS:
    raise ValueError(f'unknown tokenizer kind {kind!r}; expected one of {KINDS}')
  want = {'kind': kind}
  if kind == 'bpe':
    if not vocab_size:
      raise ValueError('tokenizer "bpe" needs vocab_size')
    want['vocab_size'] = int(vocab_size)
  if kind == 'hf':
    if not path:
      raise ValueError('tokenizer "hf" needs tokenizer_path (a tokenizer.json or its folder)')
    want['path'] = path if fileio.is_remote(path) else os.path.abspath(os.path.expanduser(path))

  tok_dir = fileio.path(workdir) / 'tokenizer' if workdir else None
  if tok_dir and (tok_dir / 'tokenizer.json').is_file():
    meta = read_meta(tok_dir) or {}
    problems = _meta_matches(meta, want)
    if problems:
      raise ValueError(f'{tok_dir} holds a different tokenizer ({"; ".join(problems)}); '
                       'use a new workdir or delete that folder to rebuild it')
    return Tokenizer.from_pretrained(tok_dir)

  if kind == 'byte':
    tok = Tokenizer(make_byte_tokenizer(), bos_token=BOS, eos_token=EOS, pad_token=PAD)
  elif kind == 'bpe':
    if train_texts is None:
      raise ValueError('tokenizer "bpe" needs train_texts to train on')
    texts = train_texts() if callable(train_texts) else train_texts
    tok = Tokenizer(train_bpe_tokenizer(texts, int(vocab_size)),
                    bos_token=BOS, eos_token=EOS, pad_token=PAD)
  else:
    tok = Tokenizer.from_pretrained(path)
  if tok_dir:
    save_folder(tok, tok_dir, want)
    saved = read_meta(tok_dir) or {}
    if saved.get('sha256') != tok.sha256:  # another process got there first; use what it wrote
      return build_tokenizer(kind, workdir=workdir, vocab_size=vocab_size, path=path)
  return tok
