"""Generate text with a PLT model, streaming tokens as they come, and report tokens/s.

  python -m experiments.generate --workdir runs/r2 --prompt 'def fib(n):' --max_new_tokens 128
  python -m experiments.generate --hf_dir export/r2 --prompt_file p.py --temperature 0.8 --top_p 0.95
  python -m experiments.generate --random_init default --prompt 'hello'   # smoke test: random weights

Several --prompt / --prompt_file flags make one batch (prompts may differ in length). Decoding is
PLT's one-pass parallel step (or the R-pass step for vanilla models), see plt_jax/decode.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence, TextIO

from plt_jax.generate import GenerationResult, Generator, SamplingParams


def load_model(workdir: Optional[str] = None, hf_dir: Optional[str] = None,
               step: Optional[int] = None, random_init: Optional[str] = None,
               tokenizer_path: Optional[str] = None):
  """(model, tokenizer) from a training work dir, an exported HF dir, or random weights.

  tokenizer_path: a tokenizer.json or its folder, replacing the one that comes with the model.
  """
  if sum(x is not None for x in (workdir, hf_dir, random_init)) != 1:
    raise ValueError('give exactly one of --workdir, --hf_dir, --random_init')
  tokenizer = None
  if workdir is not None:
    from plt_jax.checkpoint import load_for_inference  # pylint: disable=import-outside-toplevel
    model, _, tokenizer = load_for_inference(workdir, step=step)
  elif hf_dir is not None:
    from plt_jax.hf import load_hf_checkpoint  # pylint: disable=import-outside-toplevel
    model, tokenizer = load_hf_checkpoint(hf_dir)
  else:
    model, tokenizer = _random_model(random_init)
  if tokenizer_path is not None:
    from plt_jax.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = Tokenizer.from_pretrained(tokenizer_path)
  if tokenizer is None:
    raise ValueError(f'{hf_dir!r} has no tokenizer.json; pass --tokenizer')
  if tokenizer.vocab_size > model.cfg.vocab_size:
    raise ValueError(f'the tokenizer has {tokenizer.vocab_size} ids but the model only '
                     f'{model.cfg.vocab_size}')
  return model, tokenizer


def _random_model(random_init: str):
  # Random weights with the byte tokenizer: exercises the whole path without a checkpoint.
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from plt_jax.config import ModelConfig, PRESETS  # pylint: disable=import-outside-toplevel
  from plt_jax.model import PLT  # pylint: disable=import-outside-toplevel
  from plt_jax import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  if random_init not in PRESETS:
    raise ValueError(f'--random_init: unknown preset {random_init!r}; '
                     f'choose from {sorted(PRESETS)}')
  tokenizer = tok_lib.Tokenizer(tok_lib.make_byte_tokenizer(), bos_token=tok_lib.BOS,
                                eos_token=tok_lib.EOS, pad_token=tok_lib.PAD)
  cfg = ModelConfig(**{**PRESETS[random_init], 'vocab_size': tokenizer.vocab_size})
  return PLT(cfg, nnx.Rngs(0)), tokenizer


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
                   out: TextIO = sys.stdout) -> tuple[GenerationResult, list[str]]:
  """Encodes, generates with streaming to `out`, and prints throughput. Returns (result, texts)."""
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
  out.flush()
  return res, texts


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  src = p.add_argument_group('model (exactly one)')
  src.add_argument('--workdir', help='a training work dir (plt_jax.checkpoint)')
  src.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  src.add_argument('--hf_dir', help='an exported Hugging Face directory (plt_jax.hf)')
  src.add_argument('--random_init', metavar='PRESET',
                   help='random weights of a preset, byte tokenizer (smoke test)')
  p.add_argument('--tokenizer', default=None, help='tokenizer.json (or folder) to use instead')
  p.add_argument('--prompt', action='append', default=[], help='prompt text (repeatable)')
  p.add_argument('--prompt_file', action='append', default=[], help='file whose text is a prompt')
  p.add_argument('--max_new_tokens', type=int, default=128)
  p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
  p.add_argument('--top_k', type=int, default=0, help='0 = off')
  p.add_argument('--top_p', type=float, default=1.0, help='1 = off')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--no_bos', action='store_true', help='do not prepend the BOS token')
  p.add_argument('--ignore_eos', action='store_true', help='do not stop at the EOS token')
  p.add_argument('--stop_token', type=int, action='append', default=[], help='extra stop token id')
  p.add_argument('--max_len', type=int, default=None, help='cache slots per sequence')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  prompts = list(args.prompt)
  for path in args.prompt_file:
    try:
      with open(path, encoding='utf-8') as f:
        prompts.append(f.read())
    except OSError as e:
      raise SystemExit(f'error: --prompt_file: {e}') from e
  if not prompts:
    raise SystemExit('give at least one --prompt or --prompt_file')
  sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
  try:
    sampling.validate()
    model, tokenizer = load_model(args.workdir, args.hf_dir, args.step, args.random_init,
                                  args.tokenizer)
    run_generation(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                   sampling=sampling, seed=args.seed, add_bos=not args.no_bos,
                   stop_at_eos=not args.ignore_eos, stop_tokens=args.stop_token,
                   generator=Generator(model, max_len=args.max_len))
  except (ValueError, OSError) as e:  # bad requests or paths: a clear message, no traceback
    raise SystemExit(f'error: {e}') from e
  return 0


if __name__ == '__main__':
  sys.exit(main())
