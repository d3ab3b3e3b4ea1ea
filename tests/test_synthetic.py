"""data.source='synthetic': task rows and vocabulary, held-out exact match with an oracle.
Training on it (bitwise resume, the suite on a trained run) is tested in
tests/integration/test_synthetic_runs.py."""
import json

import numpy as np
import pytest

from plt_jax import data
from plt_jax.data import tasks
from plt_jax.evaluation import synthetic

TASK_PARAMS = {'hops': 2, 'length': 16, 'alphabet': 4}


def data_cfg(**kw):
  cfg = data.default_data_config()
  cfg.source, cfg.task, cfg.task_params, cfg.task_heldout = 'synthetic', 'phop', TASK_PARAMS, 16
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------- data


def test_rows_come_from_the_task_with_its_vocab(tmp_path):
  cfg = data_cfg()
  bundle = data.build_data(cfg, seq_len=64, batch_size=4, seed=7, workdir=str(tmp_path))
  spec = tasks.PHopSpec(**TASK_PARAMS)
  held = tasks.heldout(spec, 16, seed=0)
  want = tasks.train_batches(spec, batch_size=4, seq_len=64, seed=7, exclude=held)
  for _ in range(3):
    assert _same(next(bundle.train_iter), next(want))
  tok = bundle.tokenizer
  assert tok.vocab_size == len(spec.vocab) == bundle.stats['vocab_size']
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (tasks.PAD_ID, tasks.BOS_ID, tasks.EOS_ID)
  ids = np.arange(len(spec.vocab))
  assert tok.decode(ids, skip_special_tokens=False) == spec.vocab.text(ids)
  assert tok.encode(spec.vocab.text(ids[5:])) == ids[5:].tolist()
  # Validation: the packed held-out set; no bytes, so no bits per byte.
  val = list(tasks.pack_rows(held, rows=4, seq_len=64))
  assert len(bundle.val_batches) == len(val)
  assert all(_same(a, b) for a, b in zip(bundle.val_batches, val))
  assert bundle.stats['val_eval_tokens'] == sum(int(b['loss_mask'].sum()) for b in val)
  assert 'val_eval_bytes' not in bundle.stats and not tok.token_bytes.any()
  # The tokenizer in the workdir is the same vocabulary, and a rebuild reuses it.
  from plt_jax import tokenizer as tokenizer_lib
  saved = tokenizer_lib.Tokenizer.from_pretrained(str(tmp_path / 'tokenizer'))
  assert saved.sha256 == tok.sha256 and saved.eos_id == tasks.EOS_ID
  data.build_data(cfg, seq_len=64, batch_size=4, seed=7, workdir=str(tmp_path))
  with pytest.raises(ValueError, match='different tokenizer'):
    data.build_data(data_cfg(task='addition', task_params={'digits': 3}), seq_len=64,
                    batch_size=4, seed=7, workdir=str(tmp_path))


def test_heldout_never_in_training_rows(tmp_path):
  # A tiny task, so the two streams draw the same instances often unless excluded.
  cfg = data_cfg(task='binding', task_params={'chain': 1, 'distractors': 0, 'num_vars': 2},
                 task_heldout=10)
  bundle = data.build_data(cfg, seq_len=16, batch_size=4, seed=0, workdir='')
  held = {tuple(np.concatenate([p, a]).tolist()) for p, a in data.heldout_set(cfg)}
  seen = set()
  for _ in range(20):
    b = next(bundle.train_iter)
    for r in range(4):
      for s in range(1, b['segment_ids'][r].max() + 1):
        toks = b['inputs'][r][b['segment_ids'][r] == s]
        seen.add(tuple(toks[:-1].tolist()))    # without the closing EOS
  assert seen and not seen & held


def test_iterator_state_and_process_slices():
  cfg = data_cfg()
  it = data.build_data(cfg, seq_len=64, batch_size=4, seed=3, workdir='').train_iter
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert json.loads(json.dumps(state)) == state == {'batches': 3}
  want = [next(it) for _ in range(2)]
  again = data.build_data(cfg, seq_len=64, batch_size=4, seed=3, workdir='').train_iter
  again.set_state(state)
  assert all(_same(next(again), w) for w in want)
  halves = [data.build_data(cfg, seq_len=64, batch_size=4, seed=3, workdir='', process_index=p,
                            process_count=2) for p in (0, 1)]
  full = data.build_data(cfg, seq_len=64, batch_size=4, seed=3, workdir='')
  a, b, f = next(halves[0].train_iter), next(halves[1].train_iter), next(full.train_iter)
  assert all(np.array_equal(np.concatenate([a[k], b[k]]), f[k]) for k in f)
  va, vb = halves[0].val_batches[0], halves[1].val_batches[0]
  assert all(np.array_equal(np.concatenate([va[k], vb[k]]), full.val_batches[0][k]) for k in va)


@pytest.mark.parametrize('field, value, match', [
    ('task', 'nope', r"data\.task='nope': unknown task"),
    ('task_params', {'hopz': 2}, r'data\.task_params\.hopz: not a parameter of task'),
    ('task_params', {'hops': 2.5}, r'data\.task_params\.hops=2\.5: must be an integer'),
    ('task_params', {'hops': 0}, r'data\.task_params: need hops >= 1'),
    ('task_heldout', 0, r'data\.task_heldout=0'),
])
def test_bad_task_config_is_a_one_line_error(field, value, match):
  with pytest.raises(ValueError, match=match) as e:
    data.build_data(data_cfg(**{field: value}), seq_len=64, batch_size=4, seed=0, workdir='')
  assert '\n' not in str(e.value)


def test_seq_len_too_short_names_the_field():
  with pytest.raises(ValueError, match=r'train\.seq_len=16: shorter than the longest phop'):
    data.build_data(data_cfg(), seq_len=16, batch_size=4, seed=0, workdir='')


# ------------------------------------------------------------------------------- exact match


class _Oracle:
  """Stands in for `generate.Generator`: answers from a table, then EOS (dropped, as it does)."""

  def __init__(self, instances, wrong=(), no_eos=()):
    self.table = {tuple(p.tolist()): a.tolist() for p, a in instances}
    self.wrong, self.no_eos, self.calls = set(wrong), set(no_eos), []

  def generate(self, prompts, *, max_new_tokens, sampling, stop_tokens):
    assert sampling.greedy and list(stop_tokens) == [tasks.EOS_ID]
    self.calls.append((len(prompts), max_new_tokens))
    out = []
    for p in prompts:
      key = tuple(np.asarray(p).tolist())
      ans = list(self.table[key])
      if key in self.wrong:
        ans[0] = tasks.QUERY_ID
      if key in self.no_eos:   # ran to the token limit without stopping
        ans = (ans + [ans[-1]] * max_new_tokens)[:max_new_tokens]
      out.append(ans)
    return type('R', (), {'tokens': out})()


def test_accuracy_with_an_oracle():
  held = tasks.heldout(tasks.AdditionSpec(digits=3), 10, seed=0)
  oracle = _Oracle(held)
  res = synthetic.accuracy(None, held, batch_size=4, generator=oracle)
  assert (res['accuracy'], res['correct'], res['total']) == (1.0, 10, 10)
  assert oracle.calls == [(4, 5), (4, 5), (2, 5)]        # answer width 4 + the EOS
  key = lambda i: tuple(held[i][0].tolist())
  res = synthetic.accuracy(None, held, generator=_Oracle(held, wrong=[key(3)]))
  assert res['accuracy'] == pytest.approx(9 / 10) and res['correct'] == 9
  assert res['correct_mask'] == [i != 3 for i in range(10)]
  res = synthetic.accuracy(None, held, generator=_Oracle(held, no_eos=[key(0)]))
  assert res['correct'] == 9 and not res['correct_mask'][0]
