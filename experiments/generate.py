"""Generate text with a PLT model, streaming tokens as they come, and report tokens/s.

  python -m experiments.generate --workdir runs/r2 --prompt 'def fib(n):' --max_new_tokens 128
  python -m experiments.generate --hf_dir export/r2 --prompt_file prompt.py --temperature 0.8 --top_p 0.95
  python -m experiments.generate --random_init default --prompt 'hello'     # smoke test, random weights

Several --prompt / --prompt_file flags make one batch (prompts may differ in length). Decoding is
PLT's one-pass parallel step (or the R-pass step for vanilla models), see plt_jax/decode.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence, TextIO

from plt_jax.generate import GenerationResult, Generator, SamplingParams


def load_model(workdir: Optional[str] = None, hf_dir: Optional[str] = None,
               step: Optional[int] = None, random_init: Optional[str] = None):
  """(model, tokenizer) from a training work dir, an exported HF dir, or random weights."""
  if sum(x is not None for x in (workdir, hf_dir, random_init)) != 1:
    raise ValueError('give exactly one of --workdir, --hf_dir, --random_init')
  if workdir is not None:
    from plt_jax.checkpoint import load_for_inference  # pylint: disable=import-outside-toplevel
    model, _, tokenizer = load_for_inference(workdir, step=step)
    return model, tokenizer
  if hf_dir is not None:
    from plt_jax.hf import load_hf_checkpoint  # pylint: disable=import-outside-toplevel
    return load_hf_checkpoint(hf_dir)
  # Random weights with the byte tokenizer: exercises the whole path without a checkpoint.
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from plt_jax.config import ModelConfig, PRESETS  # pylint: disable=import-outside-toplevel
  from plt_jax.model import PLT  # pylint: disable=import-outside-toplevel
  from plt_jax.tokenizer import BOS, EOS, PAD, Tokenizer, make_byte_tokenizer  # pylint: disable=import-outside-toplevel
  if random_init not in PRESETS:
    raise ValueError(f'--random_init: unknown preset {random_init!r}; choose from {sorted(PRESETS)}')
  tokenizer = Tokenizer(make_byte_tokenizer(), bos_token=BOS, eos_token=EOS, pad_token=PAD)
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
      piece, self.shown[i] = text[len(self.shown[i]):], text
      if piece:
        self.out.write(piece if len(self.ids) == 1 else f'[{i}] {piece!r}\n')
        self.out.flush()


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
  texts = [tokenizer.decode(t) for t in res.tokens]
  if len(prompts) > 1:
    for i, t in enumerate(texts):
      out.write(f'\n=== [{i}] {prompts[i]!r} ->\n{t}\n')
  decode_rate = sum(max(len(t) - 1, 0) for t in res.tokens) / max(res.decode_s, 1e-9)
  out.write(f'\n--- {res.num_generated} tokens for {len(prompts)} prompt(s): '
            f'prefill {res.prefill_s:.3f}s (incl. compile on first use), decode {res.decode_s:.3f}s, '
            f'{decode_rate:.1f} tokens/s decoding, {res.tokens_per_s:.1f} tokens/s overall; '
            f'finish: {", ".join(res.finish_reasons)}\n')
  out.flush()
  return res, texts


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  src = p.add_argument_group('model (exactly one)')
  src.add_argument('--workdir', help='a training work dir (plt_jax.checkpoint)')
  src.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  src.add_argument('--hf_dir', help='an exported Hugging Face directory (plt_jax.hf)')
  src.add_argument('--random_init', metavar='PRESET', help='random weights of a preset (smoke test)')
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
    with open(path, encoding='utf-8') as f:
      prompts.append(f.read())
  if not prompts:
    raise SystemExit('give at least one --prompt or --prompt_file')
  sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
  try:
    sampling.validate()
    model, tokenizer = load_model(args.workdir, args.hf_dir, args.step, args.random_init)
    run_generation(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                   sampling=sampling, seed=args.seed, add_bos=not args.no_bos,
                   stop_at_eos=not args.ignore_eos, stop_tokens=args.stop_token,
                   generator=Generator(model, max_len=args.max_len))
  except ValueError as e:  # bad requests: prompt too long, empty, invalid sampling parameters
    raise SystemExit(f'error: {e}') from e
  return 0


if __name__ == '__main__':
  sys.exit(main())
