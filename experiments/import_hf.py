"""Import a Hugging Face directory (ours, the LoopCoder-V2 release's format, or a Llama) as a work dir.

  python -m experiments.import_hf --hf_dir=DIR --workdir=RUN [--preset=default] [--dtype=f32|bf16]

Writes RUN/config.json (the preset's experiment config with the imported model section),
RUN/tokenizer/ (when DIR has a tokenizer.json) and RUN/checkpoints/0 in the trainer's Orbax layout
(parameters plus a fresh optimizer state). `plt_jax.train.checkpoint.load_for_inference(RUN)`, the
generate CLI and `experiments.export` read it like any training run.
"""
from absl import app
from absl import flags

from plt_jax.hf.importer import import_as_workdir
from experiments.common import fail, quiet_library_logs

flags.DEFINE_string('hf_dir', None, 'Hugging Face model directory (config.json + safetensors).')
flags.DEFINE_string('workdir', None, 'Work dir to create (must not hold a run).')
flags.DEFINE_string('preset', 'default', 'plt_jax.presets preset for the non-model sections.')
flags.DEFINE_enum('dtype', None, ['f32', 'bf16'],
                  "Compute dtype of the model (default: the preset's).")
flags.DEFINE_bool('traceback', False, 'Show the full traceback of errors.')
flags.mark_flags_as_required(['hf_dir', 'workdir'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  try:
    out = import_as_workdir(FLAGS.hf_dir, FLAGS.workdir, preset=FLAGS.preset, dtype=FLAGS.dtype)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    if FLAGS.traceback:
      raise
    fail('import_hf', str(e))
  print(f'imported {FLAGS.hf_dir} into {out}')


if __name__ == '__main__':
  app.run(main)
