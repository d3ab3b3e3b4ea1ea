"""Synthetic tasks whose difficulty is a depth: p-hop induction, addition, variable binding.

Each task is a frozen spec dataclass holding its difficulty parameters. `spec.vocab` is a small
fixed token set, so instances are token ids directly (no BPE). Every vocab starts with the same
special ids: PAD=0, BOS=1, EOS=2 (as in plt_jax.tokenizer), QUERY=3, ANSWER=4.

Token contract: `sample(rng, spec) -> (prompt, answer)`, both int32 arrays. The prompt starts with
BOS and ends with ANSWER; the answer holds only answer tokens (no EOS). A training instance is
prompt + answer + EOS; a model is scored by feeding the prompt and greedy-decoding until EOS.

  p-hop    <s> v_1 .. v_n <q> p-in-decimal <a> | v[hop^p(n)]
  addition <s> a_0 .. a_{d-1} + b_0 .. b_{d-1} <a> | s_0 .. s_{w-1}   (least significant first)
  binding  <s> (x = (digit|y) ;)* <q> x <a> | digit

Packed rows (`pack_rows`, `train_batches`): the trainer's format, dict of inputs, targets,
positions, segment_ids, loss_mask, each [rows, seq_len] (int32; loss_mask float32). Instances are
never split across rows: one that does not fit in what is left of a row starts the next row.
targets[t] = inputs[t + 1] inside an instance (PAD after its EOS), positions restart at 0 per
instance, segment ids count 1, 2, ... per row (0 = padding), and loss_mask is 1 exactly where the
target is an answer token or the EOS that ends it.

Seeding rule: training instances for (spec, seed) come from SeedSequence([seed, 0, crc(spec)]) and
held-out ones from SeedSequence([seed, 1, crc(spec)]), so the two never share a random stream, for
any seeds. Independent streams can still draw the same instance by chance when the task is small;
pass the held-out set as `exclude` to the training stream to reject such instances (by hash).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import zlib
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import numpy as np

PAD, BOS, EOS, QUERY, ANSWER = '<pad>', '<s>', '</s>', '<q>', '<a>'
SPECIALS = (PAD, BOS, EOS, QUERY, ANSWER)
PAD_ID, BOS_ID, EOS_ID, QUERY_ID, ANSWER_ID = range(len(SPECIALS))
DIGITS = tuple('0123456789')
NONE = '<none>'   # p-hop answer when a hop has no earlier occurrence (never sampled, see PHopSpec)

Instance = tuple[np.ndarray, np.ndarray]
_TRAIN_STREAM, _HELDOUT_STREAM = 0, 1


class Vocab:
  """A fixed token list; id = index. The special tokens always take ids 0..4."""
  pad_id, bos_id, eos_id, query_id, answer_id = PAD_ID, BOS_ID, EOS_ID, QUERY_ID, ANSWER_ID

  def __init__(self, tokens: Sequence[str]):
    tokens = tuple(tokens)
    if tokens[:len(SPECIALS)] != SPECIALS:
      raise ValueError(f'a vocab must start with {SPECIALS}')
    if len(set(tokens)) != len(tokens):
      raise ValueError('duplicate tokens in vocab')
    self.tokens = tokens
    self._index = {t: i for i, t in enumerate(tokens)}

  def __len__(self) -> int:
    return len(self.tokens)

  def __eq__(self, other) -> bool:
    return isinstance(other, Vocab) and other.tokens == self.tokens

  def __hash__(self) -> int:
    return hash(self.tokens)

  def id(self, token: str) -> int:
    return self._index[token]

  def encode(self, tokens: Iterable[str]) -> np.ndarray:
    return np.array([self._index[t] for t in tokens], np.int32)

  def decode(self, ids: Iterable[int]) -> list[str]:
    return [self.tokens[int(i)] for i in ids]

  def text(self, ids: Iterable[int]) -> str:
    return ' '.join(self.decode(ids))


@functools.lru_cache(maxsize=None)
def _make_vocab(tokens: tuple[str, ...]) -> Vocab:
  return Vocab(SPECIALS + tokens)


def _digits(x: int) -> list[int]:
  return [int(c) for c in str(x)]


class TaskSpec:
  """What every task spec provides (the subclasses are frozen dataclasses)."""
  name: ClassVar[str]

  @property
  def vocab(self) -> Vocab:
    raise NotImplementedError

  @property
  def max_len(self) -> int:
    """The most tokens one training instance (prompt + answer + EOS) can take."""
    raise NotImplementedError

  def sample(self, rng: np.random.Generator) -> Instance:
    raise NotImplementedError


# ---------------------------------------------------------------------------------- p-hop


@functools.lru_cache(maxsize=256)
def _phop_last_match_cdf(length: int, alphabet: int, hops: int) -> np.ndarray:
  """CDF of the scan step at which the hops-th match happens, given that it happens in time.

  Scanning backwards from the query, each new position matches the symbol being looked for with
  probability 1/alphabet, independently; so the step of the hops-th match is negative binomial,
  truncated to the length - 2 positions available.
  """
  budget = length - 2
  m = np.arange(hops, budget + 1)
  log_q, log_1mq = -math.log(alphabet), math.log1p(-1.0 / alphabet)
  logp = np.array([math.lgamma(x) - math.lgamma(hops) - math.lgamma(x - hops + 1) for x in m])
  logp += hops * log_q + (m - hops) * log_1mq
  p = np.exp(logp - logp.max())
  cdf = np.cumsum(p / p.sum())
  cdf[-1] = 1.0
  return cdf


def phop_chain(symbols: Sequence[int], hops: int) -> list[int]:
  """Positions hop^0 = n-1, hop^1, ..., hop^hops (0-based); shorter if a hop fails.

  hop(i) = j + 1 for the last j < i with symbols[j] == symbols[i] (the induction-head step).
  """
  v = [int(s) for s in symbols]
  last, prev = {}, [-1] * len(v)
  for i, s in enumerate(v):
    prev[i] = last.get(s, -1)
    last[s] = i
  chain = [len(v) - 1]
  for _ in range(hops):
    j = prev[chain[-1]]
    if j < 0:
      break
    chain.append(j + 1)
  return chain


@dataclasses.dataclass(frozen=True)
class PHopSpec(TaskSpec):
  """p-hop induction (Sanford et al. 2024; Saunshi et al. 2025): p = hops, n = length, k = alphabet.

  The answer is v[hop^p(n)] (1-based positions in the papers). Sampled sequences are uniformly
  random *conditioned on* all p hops existing and on v[n-1] != v[n] (1-based). Both are built in,
  not rejected for: the scan that finds the hops is drawn directly from its conditional law (see
  `sample_symbols`). Under that condition the chain of positions strictly decreases and consecutive
  hop answers always differ, so hop^(p-1) never gives the hop^p answer. hop^(p-2) gives it with
  probability about 2/k (scan p matches at once, or the symbol after its match is hop^(p-2)'s),
  so a small alphabet leaves a p-2 hop shortcut well above chance.
  """
  hops: int = 4
  length: int = 64
  alphabet: int = 4
  name: ClassVar[str] = 'phop'

  def __post_init__(self):
    if self.hops < 1 or self.alphabet < 2:
      raise ValueError(f'need hops >= 1 and alphabet >= 2, got {self}')
    if self.length - 2 < self.hops:
      raise ValueError(f'length {self.length} is too short for {self.hops} hops')

  @property
  def vocab(self) -> Vocab:
    return _make_vocab(DIGITS + (NONE,) + tuple(f's{i}' for i in range(self.alphabet)))

  def symbol_ids(self, symbols: np.ndarray) -> np.ndarray:
    return (np.asarray(symbols) + len(SPECIALS) + len(DIGITS) + 1).astype(np.int32)

  @property
  def max_len(self) -> int:
    return 1 + self.length + 1 + len(str(self.hops)) + 1 + 1 + 1

  def sample_symbols(self, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """Symbols 0..k-1 of one sequence and its hop chain (0-based positions, hops + 1 of them).

    Position n-2 differs from the query at n-1 (0-based); then positions n-3, n-4, ... are
    scanned in order, each looking for the symbol at the current chain position. A match at j
    moves the chain to j + 1, and the next scan goes on from j, which never holds the new target. Under the uniform law every scanned position is a match with
    probability 1/k, independently, and otherwise one of the other k-1 symbols uniformly. So draw
    the step of the last match from its truncated law, the earlier matches uniformly among the
    steps before it, and leave the positions below the last match uniform.
    """
    n, k, p = self.length, self.alphabet, self.hops
    v = np.empty(n, np.int64)
    v[n - 1] = rng.integers(k)
    v[n - 2] = (v[n - 1] + rng.integers(1, k)) % k
    steps = p + int(np.searchsorted(_phop_last_match_cdf(n, k, p), rng.random(), side='right'))
    is_match = np.zeros(steps, bool)
    is_match[steps - 1] = True
    is_match[rng.choice(steps - 1, p - 1, replace=False)] = True
    shifts = rng.integers(1, k, size=steps)
    chain, target = [n - 1], v[n - 1]
    for step in range(steps):
      j = n - 3 - step
      if is_match[step]:
        v[j] = target
        chain.append(j + 1)
        target = v[j + 1]
      else:
        v[j] = (target + shifts[step]) % k
    rest = n - 2 - steps
    v[:rest] = rng.integers(k, size=rest)
    return v, chain

  def sample(self, rng: np.random.Generator) -> Instance:
    v, chain = self.sample_symbols(rng)
    prompt = np.concatenate([
        [BOS_ID], self.symbol_ids(v), [QUERY_ID],
        np.array(_digits(self.hops)) + len(SPECIALS), [ANSWER_ID]]).astype(np.int32)
    return prompt, self.symbol_ids(v[chain[-1]:chain[-1] + 1])


# ------------------------------------------------------------------------------- addition


@dataclasses.dataclass(frozen=True)
class AdditionSpec(TaskSpec):
  """Sum of `operands` numbers of `digits` digits, each written least significant digit first.

  Operands are uniform in [0, 10^digits) and zero-padded to `digits` digits; the answer is padded
  to the fixed width of the largest possible sum, so its length depends only on the spec.
  """
  digits: int = 8
  operands: int = 2
  name: ClassVar[str] = 'addition'

  def __post_init__(self):
    if self.digits < 1 or self.operands < 2:
      raise ValueError(f'need digits >= 1 and operands >= 2, got {self}')

  @property
  def answer_width(self) -> int:
    return len(str(self.operands * (10 ** self.digits - 1)))

  @property
  def vocab(self) -> Vocab:
    return _make_vocab(DIGITS + ('+',))

  @property
  def max_len(self) -> int:
    return 1 + self.operands * (self.digits + 1) + self.answer_width + 1

  def sample(self, rng: np.random.Generator) -> Instance:
    d, m = self.digits, self.operands
    plus = self.vocab.id('+')
    digits = rng.integers(10, size=(m, d))            # row i: operand i, least significant first
    prompt = [BOS_ID]
    for i in range(m):
      prompt += ([plus] if i else []) + (digits[i] + len(SPECIALS)).tolist()
    prompt.append(ANSWER_ID)
    # Column-wise sum with carries keeps this exact for any number of digits.
    out, carry = [], 0
    for col in digits.sum(axis=0).tolist():
      carry, digit = divmod(col + carry, 10)
      out.append(digit)
    while carry:
      carry, digit = divmod(carry, 10)
      out.append(digit)
    out += [0] * (self.answer_width - len(out))
    return np.array(prompt, np.int32), (np.array(out) + len(SPECIALS)).astype(np.int32)


# ------------------------------------------------------------------------ variable binding


@dataclasses.dataclass(frozen=True)
class BindingSpec(TaskSpec):
  """Resolve a chain of `chain` assignments: "a = 3 ; b = a ; c = b ; <q> c" -> 3 for chain 3.

  `distractors` more variables are each bound to a random digit or to a random variable defined
  before it (so distractors also branch off the queried chain). Every variable is assigned once and
  there are no cycles, so the statements are shuffled without changing the meaning: following the
  chain takes `chain` lookups wherever its links sit.
  """
  chain: int = 4
  distractors: int = 8
  num_vars: int = 26
  name: ClassVar[str] = 'binding'

  def __post_init__(self):
    if self.chain < 1 or self.distractors < 0:
      raise ValueError(f'need chain >= 1 and distractors >= 0, got {self}')
    if self.chain + self.distractors > self.num_vars:
      raise ValueError(f'{self.chain + self.distractors} variables needed, '
                       f'num_vars={self.num_vars}')

  @property
  def var_names(self) -> tuple[str, ...]:
    if self.num_vars <= 26:
      return tuple('abcdefghijklmnopqrstuvwxyz'[:self.num_vars])
    return tuple(f'v{i}' for i in range(self.num_vars))

  @property
  def vocab(self) -> Vocab:
    return _make_vocab(DIGITS + ('=', ';') + self.var_names)

  @property
  def max_len(self) -> int:
    return 1 + 4 * (self.chain + self.distractors) + 3 + 1 + 1

  def sample(self, rng: np.random.Generator) -> Instance:
    voc = self.vocab
    first_var = voc.id(self.var_names[0])
    names = rng.permutation(self.num_vars)[:self.chain + self.distractors] + first_var
    value = int(rng.integers(10)) + len(SPECIALS)     # digit d has id d + len(SPECIALS)
    rhs = [value] + [int(names[i - 1]) for i in range(1, self.chain)]
    for i in range(self.chain, len(names)):
      if rng.random() < 0.5:
        rhs.append(int(rng.integers(10)) + len(SPECIALS))
      else:
        rhs.append(int(names[rng.integers(i)]))
    eq, semi = voc.id('='), voc.id(';')
    prompt = [BOS_ID]
    for i in rng.permutation(len(names)).tolist():
      prompt += [int(names[i]), eq, rhs[i], semi]
    prompt += [QUERY_ID, int(names[self.chain - 1]), ANSWER_ID]
    return np.array(prompt, np.int32), np.array([value], np.int32)


# ------------------------------------------------------------------------ streams and rows


TASKS: dict[str, type] = {s.name: s for s in (PHopSpec, AdditionSpec, BindingSpec)}


def make_spec(task: str, **params: Any) -> TaskSpec:
  """The spec of task `task` ('phop', 'addition', 'binding') with its difficulty parameters."""
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r}; expected one of {tuple(TASKS)}')
  return TASKS[task](**params)


def sample(rng: np.random.Generator, spec: TaskSpec) -> Instance:
  """One (prompt, answer) instance of `spec`."""
  return spec.sample(rng)


def instance_key(instance: Instance) -> bytes:
  """A hash that identifies an instance (its prompt and answer)."""
  prompt, answer = instance
  h = hashlib.blake2b(digest_size=16)
  h.update(np.asarray(prompt, '<i4').tobytes())
  h.update(b'|')
  h.update(np.asarray(answer, '<i4').tobytes())
  return h.digest()


def _rng(spec: TaskSpec, seed: int, stream: int) -> np.random.Generator:
  if seed < 0:
    raise ValueError(f'seed must be >= 0, got {seed}')
  spec_crc = zlib.crc32(repr(spec).encode())   # stable across processes, unlike hash()
  return np.random.default_rng(np.random.SeedSequence([int(seed), stream, spec_crc]))


def heldout(spec: TaskSpec, n: int, seed: int = 0) -> list[Instance]:
  """`n` distinct instances from the held-out stream of (spec, seed); see the module docstring."""
  rng, seen, out = _rng(spec, seed, _HELDOUT_STREAM), set(), []
  for _ in range(max(1000, 50 * n)):
    if len(out) == n:
      break
    inst = spec.sample(rng)
    key = instance_key(inst)
    if key not in seen:
      seen.add(key)
      out.append(inst)
  if len(out) < n:
    raise ValueError(f'{spec} has too few distinct instances for a held-out set of {n}')
  return out


def train_instances(spec: TaskSpec, seed: int,
                    exclude: Iterable[Instance] = ()) -> Iterator[Instance]:
  """The endless training stream of (spec, seed), skipping instances equal to one in `exclude`."""
  rng = _rng(spec, seed, _TRAIN_STREAM)
  banned = {instance_key(inst) for inst in exclude}
  while True:
    inst = spec.sample(rng)
    if not banned or instance_key(inst) not in banned:
      yield inst


def pack_rows(instances: Iterable[Instance], *, rows: int, seq_len: int) -> Iterator[dict]:
  """Packs prompt + answer + EOS instances into batches of `rows` rows (see the module docstring).

  A finite stream ends with a last, padded batch holding what was left.
  """
  stream = iter(instances)
  pending = None
  done = False
  while not done:
    batch = dict(inputs=np.full((rows, seq_len), PAD_ID, np.int32),
                 targets=np.full((rows, seq_len), PAD_ID, np.int32),
                 positions=np.zeros((rows, seq_len), np.int32),
                 segment_ids=np.zeros((rows, seq_len), np.int32),
                 loss_mask=np.zeros((rows, seq_len), np.float32))
    filled = False
    for r in range(rows):
      col, seg = 0, 0
      while True:
        if pending is None:
          try:
            prompt, answer = next(stream)
          except StopIteration:
            done = True
            break
          pending = (np.concatenate([prompt, answer, [EOS_ID]]).astype(np.int32), len(prompt))
        tokens, prompt_len = pending
        n = len(tokens)
        if n > seq_len:
          raise ValueError(f'an instance of {n} tokens does not fit in seq_len {seq_len}')
        if col + n > seq_len:
          break
        seg += 1
        batch['inputs'][r, col:col + n] = tokens
        batch['targets'][r, col:col + n - 1] = tokens[1:]
        batch['positions'][r, col:col + n] = np.arange(n)
        batch['segment_ids'][r, col:col + n] = seg
        # Targets of positions prompt_len-1 .. n-2 are the answer tokens and the EOS.
        batch['loss_mask'][r, col + prompt_len - 1:col + n - 1] = 1.0
        col += n
        pending, filled = None, True
      if done:
        break
    if filled:
      yield batch


def train_batches(spec: TaskSpec, *, batch_size: int, seq_len: int, seed: int,
                  exclude: Iterable[Instance] = ()) -> Iterator[dict]:
  """Endless packed training batches of (spec, seed), [batch_size, seq_len] each."""
  if spec.max_len > seq_len:
    raise ValueError(f'seq_len {seq_len} is shorter than the longest instance ({spec.max_len})')
  return pack_rows(train_instances(spec, seed, exclude), rows=batch_size, seq_len=seq_len)


# -------------------------------------------------------------------------------- scoring


def is_correct(prediction: Sequence[int], answer: Sequence[int], eos_id: int = EOS_ID) -> bool:
  """True iff the prediction, cut at its first EOS (if any), equals the answer token for token."""
  pred = [int(t) for t in prediction]
  if eos_id in pred:
    pred = pred[:pred.index(eos_id)]
  return pred == [int(t) for t in answer]


def exact_match(predictions: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                eos_id: int = EOS_ID) -> float:
  """Share of predictions that are exactly right (`is_correct`); tokens after an EOS are ignored."""
  if len(predictions) != len(answers):
    raise ValueError(f'{len(predictions)} predictions for {len(answers)} answers')
  if not len(answers):
    raise ValueError('no answers to score')
  return sum(is_correct(p, a, eos_id) for p, a in zip(predictions, answers)) / len(answers)
