"""Evaluate a checkpoint: `python -m experiments.evaluate --workdir=RUN --suite=humaneval|perplexity`.

  --suite=humaneval   generate with the PLT decode path, run every completion in the sandbox,
                      score pass@k (refused where a sandbox layer is missing, unless
                      --allow_weaker_isolation). Writes OUT/samples.jsonl (one line per
                      problem; a rerun resumes), OUT/summary.json and OUT/meta.json.
                      OUT defaults to <run>/eval/humaneval-step<S>-n<samples>-t<temperature>.
  --suite=perplexity  bits per byte and token perplexity on the run's validation split, or on
                      --files=GLOB[,GLOB...]. Writes <run>/eval/perplexity-*.json.
  --suite=synthetic   exact match on the held-out instances of a run trained on a synthetic task.
  --loops=1,2,3,4,6   (synthetic or perplexity) the same weights at each test-time loop count,
                      and adaptive-exit rules (--exit_rules, within the trained R) against the
                      mean loops they use: <run>/eval/loops-<suite>-step<S>/ holds loops.json,
                      loops.md and pareto.png.
The model comes from a training work dir (--workdir, latest or --step checkpoint) or from an
imported Hugging Face directory (--hf_dir). `run(...)` is the same thing as a function.
"""
from __future__ import annotations

from typing import Any

from absl import app, flags

from plt_jax.evaluation import loops as loops_lib
from plt_jax.evaluation.runner import format_summary, run
from experiments.common import fail, quiet_library_logs


_SUITE = flags.DEFINE_enum('suite', 'humaneval', ['humaneval', 'perplexity', 'synthetic'],
                            "What to evaluate (synthetic: exact match on the run's held-out "
                            'task instances).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Training work dir (config.json, checkpoints/).')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face checkpoint directory (instead of a '
                              'work dir for the model; --workdir may still supply the val split).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest complete one).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                           'Compute dtype (default: the run\'s; float32 for --hf_dir).')
_OUT = flags.DEFINE_string('out_dir', None, 'Output directory (default: <run>/eval/...).')
_PROGRESS = flags.DEFINE_bool('progress', True, 'Show progress bars.')
# humaneval
_SAMPLES = flags.DEFINE_integer('samples', 1, 'Samples per problem (n of pass@k).')
_TEMPERATURE = flags.DEFINE_float('temperature', None,
                                  'Sampling temperature (default: 0 = greedy for --samples=1, '
                                  'else 0.8).')
_TOP_P = flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass (when temperature > 0).')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Top-k filter (0 = off).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 384, 'Tokens generated per completion at most.')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Only the first N problems (0 = all 164).')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'Sequences per generation batch.')
_WORKERS = flags.DEFINE_integer('workers', 4, 'Sandboxes running at once.')
_TIMEOUT = flags.DEFINE_float('timeout', 10.0, 'Wall-clock seconds per program.')
_MEMORY = flags.DEFINE_integer('memory_mb', 1024, 'Address-space limit per process (MiB).')
_NPROC = flags.DEFINE_integer('nproc', 8, 'Processes a program may have (itself included).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_KS = flags.DEFINE_list('ks', ['1', '10', '100'], 'k of pass@k (those <= --samples are reported).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Discard earlier results in the output dir.')
_WEAKER = flags.DEFINE_bool('allow_weaker_isolation', False,
                            'Run completions even where a sandbox layer is missing on this '
                            'machine (summary.json isolation.missing lists them).')
# perplexity
_FILES = flags.DEFINE_list('files', [], 'Globs of text files to score instead of the val split.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, 'Row length (default: the run\'s train.seq_len; '
                                'for --hf_dir with --files, 1024 capped at max_seq_len).')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', -1, 'Validation batches: -1 = as many as '
                                     'the run evaluated, 0 = the whole split.')
_EVAL_BATCH_SIZE = flags.DEFINE_integer('eval_batch_size', 0,
                                        'Rows per perplexity batch (default: the run\'s).')
# loop counts
_LOOPS = flags.DEFINE_string('loops', '', 'Test-time loop counts to evaluate, e.g. 1,2,3,4,6 '
                             '(synthetic or perplexity); empty: evaluate the trained count only.')
_EXIT_RULES = flags.DEFINE_list('exit_rules', None, 'Adaptive-exit rules for --loops, e.g. '
                                'confidence:0.9,kl:0.01 (default: a sweep of thresholds of both).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  suite = _SUITE.value
  kwargs: dict[str, Any] = dict(progress=_PROGRESS.value)
  if suite == 'humaneval':
    kwargs.update(samples=_SAMPLES.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                  top_k=_TOP_K.value, max_new_tokens=_MAX_NEW.value, limit=_LIMIT.value,
                  batch_size=_BATCH.value, workers=_WORKERS.value, timeout=_TIMEOUT.value,
                  memory_mb=_MEMORY.value, nproc=_NPROC.value, seed=_SEED.value,
                  ks=[int(k) for k in _KS.value], overwrite=_OVERWRITE.value,
                  allow_weaker_isolation=_WEAKER.value)
  if _LOOPS.value:
    try:
      table = loops_lib.evaluate_workdir(
          suite, _LOOPS.value, workdir=_WORKDIR.value, hf_dir=_HF_DIR.value, step=_STEP.value,
          rules=_EXIT_RULES.value, out_dir=_OUT.value, batch_size=_EVAL_BATCH_SIZE.value,
          limit=_LIMIT.value, dtype=_DTYPE.value)
    except (ValueError, FileNotFoundError) as e:
      fail('evaluate', str(e))
    print(f'{suite}: R={table["trained_loops"]} {table["loop_mode"]}, {table["tokens"]:,} tokens '
          f'scored\n{table["table_md"]}\n  results: {table["out_dir"]}', flush=True)
    return
  try:
    summary = run(suite, workdir=_WORKDIR.value, hf_dir=_HF_DIR.value, step=_STEP.value,
                  dtype=_DTYPE.value, out_dir=_OUT.value, files=_FILES.value,
                  seq_len=_SEQ_LEN.value, eval_batches=_EVAL_BATCHES.value,
                  eval_batch_size=_EVAL_BATCH_SIZE.value, **kwargs)
  except (ValueError, FileNotFoundError) as e:
    fail('evaluate', str(e))
  print(format_summary(summary), flush=True)


if __name__ == '__main__':
  app.run(main)
