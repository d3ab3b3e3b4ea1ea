"""Export a training run as a Hugging Face directory (PyTorch, `trust_remote_code=True`).

  python -m experiments.export --workdir=runs/r2-default --out=hf/r2 [--step=N] [--dtype=bf16|f32]
                               [--max_shard_size=5GB] [--overwrite]

Only parses flags and calls `plt_jax.hf.export_workdir`. The directory then loads with
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` (R = 1 exports also as a plain
`LlamaForCausalLM`) and with `plt_jax.hf.load_hf_checkpoint(out)`.
"""
from absl import app
from absl import flags
from experiments.common import fail, quiet_library_logs

flags.DEFINE_string('workdir', None, 'Training work dir (holds config.json, checkpoints/, tokenizer/).')
flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest complete one).')
flags.DEFINE_string('out', None, 'Output directory (must be empty or absent, unless --overwrite).')
flags.DEFINE_enum('dtype', 'bf16', ['bf16', 'f32'], 'Dtype of the saved weights.')
flags.DEFINE_string('max_shard_size', '5GB', 'Largest safetensors file (e.g. 5GB, 500MB, bytes).')
flags.DEFINE_bool('overwrite', False, 'Replace the model files of a non-empty --out.')
flags.DEFINE_bool('traceback', False, 'Show the full traceback of errors.')
flags.mark_flags_as_required(['workdir', 'out'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  from plt_jax import hf  # pylint: disable=g-import-not-at-top
  try:
    out = hf.export_workdir(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                            max_shard_size=FLAGS.max_shard_size, overwrite=FLAGS.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    if FLAGS.traceback:
      raise
    fail('export', str(e))
  print(f'exported {FLAGS.workdir} to {out}')


if __name__ == '__main__':
  app.run(main)
