"""Make a LoopCoder-V2 release directory loadable in PyTorch as it is.

  python -m experiments.adopt_release DIR

Writes the project's configuration_plt.py and modeling_plt.py into DIR and adds them to
config.json's auto_map (AutoConfig, AutoModel, AutoModelForCausalLM), keeping the release's
model_type. The weights and every other file stay as they are. Then

  AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

loads the released weights. A directory that is not a LoopCoder-V2 layout is refused, untouched.
Details: plt_jax/hf/adopt.py.
"""
import argparse
import sys

from experiments.common import fail


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='adopt_release', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('directory', help='the release directory (config.json + safetensors); local or '
                                   'gs://')
  args = p.parse_args(argv)
  from plt_jax.hf import adopt  # pylint: disable=g-import-not-at-top
  try:
    changed = adopt.adopt_release(args.directory)
  except (ValueError, FileNotFoundError) as e:
    fail('adopt_release', str(e))
  if changed:
    print(f'adopted {args.directory}: wrote {", ".join(changed)}')
  else:
    print(f'{args.directory} was already adopted: nothing changed')
  return 0


if __name__ == '__main__':
  sys.exit(main())
