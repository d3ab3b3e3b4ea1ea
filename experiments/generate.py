"""Generate text with a PLT model, streaming tokens as they come, and report tokens/s.

  python -m experiments.generate --workdir runs/r2 --prompt 'def fib(n):' --max_new_tokens 128
  python -m experiments.generate --hf_dir export/r2 --prompt_file p.py --temperature 0.8 --top_p 0.95
  python -m experiments.generate --random_init default --prompt 'hello'   # smoke test: random weights

Several --prompt / --prompt_file flags make one batch (prompts may differ in length). Decoding is
PLT's one-pass parallel step (or the R-pass step for vanilla models), see plt_jax/infer/decode.py.
--exit=confidence:0.9 lets each token leave at the first loop whose readout is that sure.
"""
from __future__ import annotations

import argparse
import sys

from plt_jax import fileio
from plt_jax.infer.generate import Generator, SamplingParams, run_generation
# Importable from here under the name this command has always given it.
from plt_jax.infer.generate import load_model_and_tokenizer as load_model


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  src = p.add_argument_group('model (exactly one)')
  src.add_argument('--workdir', help='a training work dir (plt_jax.train.checkpoint)')
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
  p.add_argument('--exit', default=None, metavar='RULE',
                 help="adaptive loop exit for PLT: 'confidence:TAU' or 'kl:EPS' (docs/decoding.md)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  prompts = list(args.prompt)
  for path in args.prompt_file:
    try:
      prompts.append(fileio.read_text(path))
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
                   generator=Generator(model, max_len=args.max_len, exit_rule=args.exit))
  except (ValueError, OSError) as e:  # bad requests or paths: a clear message, no traceback
    raise SystemExit(f'error: {e}') from e
  return 0


if __name__ == '__main__':
  sys.exit(main())
