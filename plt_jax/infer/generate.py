"""Batched generation on top of `plt_jax.infer.decode`: sampling, stop tokens, streaming.

Shapes are static: prompts are right-padded to a bucketed width and the cache to a bucketed
max_len, so a new prompt of similar size reuses the compiled prefill, and every token reuses the one
compiled decode step (its cache argument is donated, so the step updates the cache in place).
Each step is dispatched before the previous step's tokens are pulled to the host, so host work
(stop checks, streaming) overlaps device work; at most one step is wasted at the end.
`run_generation` is the text-level path behind `python -m experiments.generate`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Callable, Optional, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from plt_jax import loop_exit
from plt_jax import tokenizer as tok_lib
from plt_jax.infer import loading
from plt_jax.infer.decode import Decoder

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def validate(self, vocab_size: Optional[int] = None) -> 'SamplingParams':
    t, k, p = self.temperature, self.top_k, self.top_p
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
      raise ValueError(f'temperature={t!r}: must be a finite number >= 0 (0 means greedy)')
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
      raise ValueError(f'top_k={k!r}: must be an integer >= 0 (0 switches it off)')
    if vocab_size is not None and k > vocab_size:
      raise ValueError(f'top_k={k} exceeds the vocabulary size {vocab_size}')
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
      raise ValueError(f'top_p={p!r}: must lie in (0, 1] (1 switches it off)')
    return self

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def sample_logits(logits_BV: Array, key: Array, params: SamplingParams) -> Array:
  """Next tokens [B] int32 from float32 logits: temperature, then top-k, then top-p (nucleus)."""
  if params.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  x = logits_BV.astype(jnp.float32) / params.temperature
  if params.top_k:
    kth = jax.lax.top_k(x, params.top_k)[0][:, -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if params.top_p < 1.0:
    # Keep the smallest prefix of tokens, by decreasing probability, whose mass reaches top_p.
    x_sorted = -jnp.sort(-x, axis=-1)
    p_sorted = jax.nn.softmax(x_sorted, axis=-1)
    mass_before = jnp.cumsum(p_sorted, axis=-1) - p_sorted
    n_keep = jnp.maximum(jnp.sum(mass_before < params.top_p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(x_sorted, n_keep - 1, axis=-1)
    x = jnp.where(x < threshold, -jnp.inf, x)
  return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def _sampler(params: SamplingParams, compiler_options: tuple = ()):
  """Jitted (logits, key, step) -> tokens, with the step folded into the key."""
  opts = {'compiler_options': dict(compiler_options)} if compiler_options else {}
  return jax.jit(lambda logits, key, step: sample_logits(
      logits, jax.random.fold_in(key, step), params), **opts)


@dataclasses.dataclass
class GenerationResult:
  """tokens: generated ids per prompt (stop token excluded); finish_reasons: 'stop' | 'length'.

  Times (seconds): prefill_s covers the prompts and the first token, first_step_s the first decode
  step (both include compilation on first use), decode_s every later step, during which
  decode_tokens tokens were emitted.
  """
  tokens: list[list[int]]
  finish_reasons: list[str]
  prompt_lengths: list[int]
  prefill_s: float
  first_step_s: float
  decode_s: float
  decode_tokens: int
  num_steps: int
  # With an exit rule (`Generator(exit_rule=...)`): the mean loop count of the tokens the decode
  # steps emitted (the first token comes from the prefill, at loop R) and the mean number of loop
  # rows a decode step ran. None without a rule.
  mean_loops: Optional[float] = None
  mean_rows: Optional[float] = None

  @property
  def num_generated(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_s(self) -> float:
    """Generated tokens per second of wall time, everything included."""
    return self.num_generated / max(self.prefill_s + self.first_step_s + self.decode_s, 1e-9)

  @property
  def decode_tokens_per_s(self) -> float:
    """Steady-state decoding rate (after the first step); 0 when too few steps ran."""
    return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


# callback(step, tokens [B] np.int32, emitted [B] bool): emitted[b] says tokens[b] was appended to
# sequence b's output at this step (False once b has stopped, and for the stop token itself).
StreamCallback = Callable[[int, np.ndarray, np.ndarray], None]


class Generator:
  """Generation for one model. Compiled functions are reused across calls with the same buckets.

  max_len: cache slots per sequence; by default the smallest multiple of `len_bucket` that fits
  the request (capped at cfg.max_seq_len). prompt_bucket: prompts are right-padded to a multiple.
  exit_rule: adaptive loop exit for PLT decode steps ('confidence:0.9', 'kl:5e-4' or a
  `loop_exit.ExitRule`; see `decode.plt_exit_decode_step`); None: every token uses loop R.
  """

  def __init__(self, model, *, max_len: Optional[int] = None, len_bucket: int = 64,
               prompt_bucket: int = 16, compiler_options: Optional[dict] = None,
               exit_rule=None):
    self.model = model
    self.cfg = model.cfg
    if isinstance(exit_rule, str):
      exit_rule = loop_exit.ExitRule.parse(exit_rule)
    if exit_rule is not None and self.cfg.loop_mode == 'vanilla':
      raise ValueError(f'exit rule {exit_rule}: adaptive loop exit is for PLT decoding; a vanilla '
                       'looped model runs its loops one after another (evaluate it at R\' instead)')
    self.exit_rule = exit_rule
    self.max_len = max_len
    self.len_bucket, self.prompt_bucket = len_bucket, prompt_bucket
    self.compiler_options = compiler_options
    self._decoders: dict[int, Decoder] = {}

  def decoder(self, max_len: int) -> Decoder:
    if max_len not in self._decoders:
      self._decoders[max_len] = Decoder(self.model, max_len,
                                        compiler_options=self.compiler_options)
    return self._decoders[max_len]

  def _check_request(self, prompts, max_new_tokens, sampling: SamplingParams, stop_tokens):
    """(stop token set, longest prompt, cache slots) of a valid request; else a ValueError."""
    cfg = self.cfg
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
        or max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens!r}: must be an integer >= 1')
    sampling.validate(cfg.vocab_size)
    stop = {int(t) for t in stop_tokens}
    bad = [t for t in stop if not 0 <= t < cfg.vocab_size]
    if bad:
      raise ValueError(f'stop tokens {bad} lie outside the vocabulary [0, {cfg.vocab_size})')
    if len(prompts) == 0:
      raise ValueError('no prompts given (the batch is empty)')
    longest = max(len(p) for p in prompts)
    need = longest + max_new_tokens - 1  # the last generated token is never fed back
    max_len = self.max_len or min(_round_up(max(need, 1), self.len_bucket), cfg.max_seq_len)
    if need > max_len:
      where = 'max_len' if self.max_len else "the model's max_seq_len"
      raise ValueError(f'a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} needs '
                       f'{need} cache slots, more than {where}={max_len}')
    return stop, longest, max_len

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampling: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (),
               seed: int = 0, callback: Optional[StreamCallback] = None) -> GenerationResult:
    stop, longest, max_len = self._check_request(prompts, max_new_tokens, sampling, stop_tokens)
    dec = self.decoder(max_len)
    sample = _sampler(sampling, tuple(sorted((self.compiler_options or {}).items())))
    width = min(_round_up(max(longest, 1), self.prompt_bucket), max_len)

    b = len(prompts)
    out: list[list[int]] = [[] for _ in range(b)]
    reasons = ['length'] * b
    active = np.ones(b, bool)
    key = jax.random.key(seed)

    t0 = time.perf_counter()
    logits, cache = dec.prefill(prompts, width=width, extra=max_new_tokens - 1)
    tok = sample(logits, key, 0)
    tok.block_until_ready()
    t_prefilled = time.perf_counter()
    prefill_s = t_prefilled - t0

    steps, decode_tokens, t_steady = 0, 0, None
    exits, rows_run, loops_used, exit_tokens = {}, [], 0, 0
    for i in range(max_new_tokens):
      nxt = None
      if i + 1 < max_new_tokens:  # dispatch the next step before looking at this one's tokens
        if self.exit_rule is None:
          logits, cache = dec.step(cache, tok)
        else:
          logits, exits[i + 1], rows, cache = dec.exit_step(cache, tok, self.exit_rule)
          rows_run.append(rows)
        nxt = sample(logits, key, i + 1)
        steps += 1
      host = np.asarray(tok)
      emitted = active.copy()
      for j in np.flatnonzero(active):
        if int(host[j]) in stop:
          active[j], emitted[j], reasons[j] = False, False, 'stop'
        else:
          out[j].append(int(host[j]))
      if i in exits:
        loops_used += int((np.asarray(exits.pop(i)) + 1)[emitted].sum())
        exit_tokens += int(emitted.sum())
      if i >= 2:  # produced by a step dispatched after the first step had finished
        decode_tokens += int(emitted.sum())
      if callback is not None:
        callback(i, host, emitted)
      if i == 0 and nxt is not None:  # the first step may include its compilation: time it apart
        nxt.block_until_ready()
        t_steady = time.perf_counter()
      if not active.any() or nxt is None:
        break
      tok = nxt
    if nxt is not None:
      nxt.block_until_ready()
    t_end = time.perf_counter()
    first_step_s = (t_steady or t_end) - t_prefilled
    decode_s = t_end - t_steady if t_steady is not None else 0.0
    del cache
    result = GenerationResult(out, reasons, [len(p) for p in prompts], prefill_s, first_step_s,
                              decode_s, decode_tokens, steps)
    if self.exit_rule is not None:
      result.mean_loops = loops_used / exit_tokens if exit_tokens else None
      result.mean_rows = float(np.mean([int(r) for r in rows_run])) if rows_run else None
    return result


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), stop_tokens: Sequence[int] = (),
             seed: int = 0, callback: Optional[StreamCallback] = None,
             max_len: Optional[int] = None, exit_rule=None) -> GenerationResult:
  """One-shot convenience wrapper around `Generator(model).generate(...)`."""
  return Generator(model, max_len=max_len, exit_rule=exit_rule).generate(
      prompts, max_new_tokens=max_new_tokens, sampling=sampling, stop_tokens=stop_tokens,
      seed=seed, callback=callback)


# ------------------------------------------------------------------------------------------------
# Text in, text out (what `python -m experiments.generate` runs)

def load_model_and_tokenizer(workdir: Optional[str] = None, hf_dir: Optional[str] = None,
                             step: Optional[int] = None, random_init: Optional[str] = None,
                             tokenizer_path: Optional[str] = None):
  """(model, tokenizer) from a training work dir, an exported HF dir, or random weights.

  tokenizer_path: a tokenizer.json or its folder, replacing the one that comes with the model.
  """
  if sum(x is not None for x in (workdir, hf_dir, random_init)) != 1:
    raise ValueError('give exactly one of --workdir, --hf_dir, --random_init')
  if random_init is not None:
    model, tokenizer = loading.random_model(random_init)
    if tokenizer_path is not None:
      tokenizer = tok_lib.Tokenizer.from_pretrained(tokenizer_path)
  else:
    source, path = ('workdir', workdir) if workdir is not None else ('hf', hf_dir)
    loaded = loading.load_model(path, source=source, step=step, tokenizer_path=tokenizer_path)
    model, tokenizer = loaded.model, loaded.tokenizer
  if tokenizer is None:
    raise ValueError(f'{hf_dir!r} has no tokenizer.json; pass --tokenizer')
  if tokenizer.vocab_size > model.cfg.vocab_size:
    raise ValueError(f'the tokenizer has {tokenizer.vocab_size} ids but the model only '
                     f'{model.cfg.vocab_size}')
  return model, tokenizer


class TextStreamer:
  """Turns emitted token ids into text pieces: decodes each sequence's ids so far and prints what
  is new, holding back an incomplete UTF-8 character (decoded as U+FFFD) until it completes."""

  def __init__(self, tokenizer, batch: int, out: TextIO):
    self.tokenizer, self.out = tokenizer, out
    self.ids = [[] for _ in range(batch)]
    self.shown = [''] * batch

  def __call__(self, step, tokens, emitted) -> None:
    del step
    for i in emitted.nonzero()[0]:
      self.ids[i].append(int(tokens[i]))
      text = self.tokenizer.decode(self.ids[i])
      if text.endswith('\ufffd'):
        continue
      self._show(i, text)

  def _show(self, i: int, text: str) -> None:
    piece, self.shown[i] = text[len(self.shown[i]):], text
    if piece:
      self.out.write(piece if len(self.ids) == 1 else f'[{i}] {piece!r}\n')
      self.out.flush()

  def finish(self) -> None:
    """Shows what was held back (a sequence may end inside a multi-byte character)."""
    for i, ids in enumerate(self.ids):
      self._show(i, self.tokenizer.decode(ids))


def run_generation(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128,
                   sampling: SamplingParams = SamplingParams(), seed: int = 0,
                   add_bos: bool = True, stop_at_eos: bool = True,
                   stop_tokens: Sequence[int] = (), generator: Optional[Generator] = None,
                   out: Optional[TextIO] = None) -> tuple[GenerationResult, list[str]]:
  """Encodes, generates with streaming to `out` (default: sys.stdout as it is at the call), and
  prints throughput. Returns (result, texts)."""
  out = out or sys.stdout
  ids = [([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode(p)) for p in prompts]
  stops = list(stop_tokens) + ([tokenizer.eos_id] if stop_at_eos else [])
  generator = generator or Generator(model)
  if len(prompts) == 1:
    out.write(prompts[0])
    out.flush()
  streamer = TextStreamer(tokenizer, len(prompts), out)
  res = generator.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_tokens=stops, seed=seed, callback=streamer)
  streamer.finish()
  texts = [tokenizer.decode(t) for t in res.tokens]
  if len(prompts) > 1:
    for i, t in enumerate(texts):
      out.write(f'\n=== [{i}] {prompts[i]!r} ->\n{t}\n')
  out.write(f'\n--- {res.num_generated} tokens for {len(prompts)} prompt(s): '
            f'prefill {res.prefill_s:.3f}s and first step {res.first_step_s:.3f}s (both include '
            f'compilation on first use), then {res.decode_tokens_per_s:.1f} tokens/s decoding; '
            f'{res.tokens_per_s:.1f} tokens/s overall; finish: {", ".join(res.finish_reasons)}\n')
  if generator.exit_rule is not None and res.mean_loops is not None:
    out.write(f'--- exit {generator.exit_rule}: {res.mean_loops:.2f} loops per decoded token on '
              f'average, {res.mean_rows:.2f} loop rows run per step (of {model.cfg.num_loops})\n')
  out.flush()
  return res, texts
