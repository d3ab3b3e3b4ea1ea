"""Synthetic tasks: answers vs brute-force solvers, p-hop depth, exact match, packing, seeding."""
import itertools

import numpy as np
import pytest

from plt_jax.data import tasks

KEYS = ('inputs', 'targets', 'positions', 'segment_ids', 'loss_mask')


def _instances(spec, n=200, seed=0):
  rng = np.random.default_rng(seed)
  return [tasks.sample(rng, spec) for _ in range(n)]


def _check_layout(spec, prompt, answer):
  assert prompt.dtype == np.int32 and answer.dtype == np.int32
  assert prompt[0] == tasks.BOS_ID and prompt[-1] == tasks.ANSWER_ID
  assert tasks.EOS_ID not in answer.tolist() and len(answer) > 0
  assert len(prompt) + len(answer) + 1 <= spec.max_len
  assert 0 <= min(prompt.min(), answer.min()) and max(prompt.max(), answer.max()) < len(spec.vocab)


# ------------------------------------------------------------------------------------ p-hop


def _naive_hop(v, i):
  """Scan back from i - 1 for v[i]; the position after the match, or None."""
  for j in range(i - 1, -1, -1):
    if v[j] == v[i]:
      return j + 1
  return None


def _decode_phop(spec, prompt):
  toks = spec.vocab.decode(prompt)
  q = toks.index(tasks.QUERY)
  assert q == 1 + spec.length
  return toks[1:q], int(''.join(toks[q + 1:-1]))


def _phop_answers(v, hops):
  """Symbol at hop^0 .. hop^hops of v, None from the first failed hop on."""
  i, out = len(v) - 1, [v[-1]]
  for _ in range(hops):
    i = None if i is None else _naive_hop(v, i)
    out.append(None if i is None else v[i])
  return out


PHOP_SPECS = [tasks.PHopSpec(hops=1, length=16, alphabet=2),
              tasks.PHopSpec(hops=4, length=64, alphabet=4),
              tasks.PHopSpec(hops=16, length=64, alphabet=4),
              # 30 matches among 38 scanned positions at rate 1/8: rejection sampling could not.
              tasks.PHopSpec(hops=30, length=40, alphabet=8)]


@pytest.mark.parametrize('spec', PHOP_SPECS, ids=str)
def test_phop_answers_match_brute_force(spec):
  for prompt, answer in _instances(spec):
    _check_layout(spec, prompt, answer)
    v, hops = _decode_phop(spec, prompt)
    assert hops == spec.hops and len(v) == spec.length
    answers = _phop_answers(v, hops)
    assert None not in answers                        # every hop exists, by construction
    assert spec.vocab.decode(answer) == [answers[-1]]


@pytest.mark.parametrize('spec', PHOP_SPECS[1:3] + [tasks.PHopSpec(hops=8, length=64, alphabet=8)],
                         ids=str)
def test_phop_needs_all_hops(spec):
  insts = _instances(spec)
  answers = [_phop_answers(_decode_phop(spec, p)[0], spec.hops) for p, _ in insts]
  differs = np.array([[a[q] != a[-1] for q in range(spec.hops)] for a in answers], float).mean(0)
  k = spec.alphabet
  # One hop short is always wrong, by construction.
  assert differs[-1] == 1.0
  # Two hops short lands on hop^p's symbol when scan p matches at once (1/k) or the symbol after
  # its match happens to be hop^(p-2)'s (1/k more): wrong with probability 1 - 2/k.
  assert abs(differs[-2] - (1 - 2 / k)) < 0.1, differs
  # Fewer hops than that are wrong more often than not.
  assert differs[:-2].min() > 0.55, differs
  # Symbols stay close to uniform despite the conditioning.
  symbols = [int(t[1:]) for p, _ in insts[:50] for t in _decode_phop(spec, p)[0]]
  freq = np.bincount(symbols, minlength=k) / len(symbols)
  assert np.all(np.abs(freq - 1 / k) < 0.05), freq


def test_phop_is_uniform_given_its_conditions():
  # Every sequence with v[n-2] != v[n-1] whose 2 hops exist, and only those, equally often.
  spec = tasks.PHopSpec(hops=2, length=6, alphabet=2)
  valid = {v for v in itertools.product(range(2), repeat=6)
           if v[-2] != v[-1] and None not in _phop_answers(list(v), 2)}
  rng = np.random.default_rng(1)
  draws = [tuple(spec.sample_symbols(rng)[0].tolist()) for _ in range(3000)]
  counts = {v: draws.count(v) for v in valid}
  assert set(draws) == valid and len(valid) == 22
  expect = len(draws) / len(valid)
  chi2 = sum((c - expect) ** 2 / expect for c in counts.values())
  assert chi2 < 45, (chi2, counts)                  # 21 degrees of freedom: p ~ 0.002 at 45


def test_phop_chain_helper():
  v = [0, 1, 0, 2, 1, 0, 1]
  # hop(6): last 1 before 6 is at 4 -> 5 (0); last 0 before 5 at 2 -> 3 (2); no 2 before 3.
  assert tasks.phop_chain(v, 5) == [6, 5, 3]
  rng = np.random.default_rng(0)
  spec = tasks.PHopSpec(hops=6, length=48, alphabet=3)
  for _ in range(50):
    v, chain = spec.sample_symbols(rng)
    assert tasks.phop_chain(v, spec.hops) == chain


def test_phop_rejects_impossible_spec():
  with pytest.raises(ValueError):
    tasks.PHopSpec(hops=10, length=11)


# --------------------------------------------------------------------------------- addition


@pytest.mark.parametrize('spec', [tasks.AdditionSpec(digits=1), tasks.AdditionSpec(digits=5),
                                  tasks.AdditionSpec(digits=24),
                                  tasks.AdditionSpec(digits=6, operands=4)], ids=str)
def test_addition_answers_match_brute_force(spec):
  width = len(str(spec.operands * (10 ** spec.digits - 1)))
  for prompt, answer in _instances(spec):
    _check_layout(spec, prompt, answer)
    text = ''.join(spec.vocab.decode(prompt[1:-1]))
    operands = text.split('+')
    assert len(operands) == spec.operands and {len(x) for x in operands} == {spec.digits}
    digits = ''.join(spec.vocab.decode(answer))
    assert len(digits) == width
    assert int(digits[::-1]) == sum(int(x[::-1]) for x in operands)


def test_addition_carries_through():
  # 999...9 + 1 is in the instance space; the column sum must carry into the extra digit.
  spec = tasks.AdditionSpec(digits=1)
  seen = {tuple(p.tolist()): a.tolist() for p, a in _instances(spec, 2000)}
  nine_plus_one = tuple([tasks.BOS_ID, 9 + 5, spec.vocab.id('+'), 1 + 5, tasks.ANSWER_ID])
  assert spec.vocab.decode(seen[nine_plus_one]) == ['0', '1']


# ---------------------------------------------------------------------------------- binding


@pytest.mark.parametrize('spec', [tasks.BindingSpec(chain=1, distractors=0),
                                  tasks.BindingSpec(chain=4, distractors=8),
                                  tasks.BindingSpec(chain=12, distractors=14),
                                  tasks.BindingSpec(chain=20, distractors=20, num_vars=40)],
                         ids=str)
def test_binding_answers_match_brute_force(spec):
  for prompt, answer in _instances(spec):
    _check_layout(spec, prompt, answer)
    toks = spec.vocab.decode(prompt)
    q = toks.index(tasks.QUERY)
    body, query = toks[1:q], toks[q + 1]
    assert len(body) == 4 * (spec.chain + spec.distractors)
    env = {}
    for k in range(0, len(body), 4):
      name, eq, rhs, semi = body[k:k + 4]
      assert (eq, semi) == ('=', ';') and name not in env
      env[name] = rhs
    x, steps = query, 0
    while not x.isdigit():
      x, steps = env[x], steps + 1
    assert steps == spec.chain
    assert spec.vocab.decode(answer) == [x]


def test_binding_statements_are_shuffled():
  # The queried chain's links do not come in order, so reading them left to right is not enough.
  spec = tasks.BindingSpec(chain=4, distractors=8)
  in_order = 0
  for prompt, _ in _instances(spec):
    toks = spec.vocab.decode(prompt)
    q = toks.index(tasks.QUERY)
    defined_at = {toks[k]: k for k in range(1, q, 4)}
    x, where = toks[q + 1], []
    while not x.isdigit():
      where.append(defined_at[x])
      x = toks[defined_at[x] + 2]
    in_order += where == sorted(where, reverse=True)
  assert in_order / 200 < 0.15                       # 1/4! ~ 0.04 if shuffled uniformly


# ------------------------------------------------------------------------------ exact match


def test_exact_match_hand_made():
  e = tasks.EOS_ID
  answers = [np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)]
  assert tasks.exact_match([[5, 6, 7, e], [8, 9, e]], answers) == 1.0
  assert tasks.exact_match([[5, 6, 7], [8, 9]], answers) == 1.0          # stopped at max length
  assert tasks.exact_match([[5, 6, 8, e], [8, 9, e]], answers) == 0.5    # one token wrong
  assert tasks.exact_match([[5, 6, e], [8, 9, e]], answers) == 0.5       # too short
  assert tasks.exact_match([[5, 6, 7, e, 3, 3], [8, 9, e, e]], answers) == 1.0  # after EOS
  assert tasks.exact_match([[5, 6, 7, 7, e], [8, 9, e]], answers) == 0.5  # too long
  assert tasks.exact_match([[], [8, 9, e]], answers) == 0.5               # empty
  assert tasks.exact_match([[e, 5, 6, 7], []], answers) == 0.0
  assert tasks.exact_match(np.array([[5, 6, 7, e], [8, 8, e, 0]]), answers) == 0.5
  with pytest.raises(ValueError):
    tasks.exact_match([[5, 6, 7]], answers)


def test_exact_match_scores_true_answers_and_shifted_ones():
  insts = _instances(tasks.AdditionSpec(digits=4), 100)
  answers = [a for _, a in insts]
  assert tasks.exact_match([np.append(a, tasks.EOS_ID) for a in answers], answers) == 1.0
  rolled = answers[1:] + answers[:1]
  score = tasks.exact_match(rolled, answers)
  assert score < 0.05


# ---------------------------------------------------------------------------------- packing


def _segments(batch):
  """(row, start, stop) of every instance, in stream order."""
  out = []
  for r, seg in enumerate(batch['segment_ids']):
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1))
      out.append((r, idx[0], idx[-1] + 1))
  return out


@pytest.mark.parametrize('spec,seq_len', [(tasks.PHopSpec(hops=3, length=20), 64),
                                          (tasks.AdditionSpec(digits=3), 40),
                                          (tasks.BindingSpec(chain=3, distractors=2), 60)],
                         ids=str)
def test_packed_rows(spec, seq_len):
  rows = 4
  gen = tasks.train_batches(spec, batch_size=rows, seq_len=seq_len, seed=7)
  batches = [next(gen) for _ in range(3)]
  stream = tasks.train_instances(spec, seed=7)
  for batch in batches:
    assert set(batch) == set(KEYS)
    for k in KEYS:
      assert batch[k].shape == (rows, seq_len)
      assert batch[k].dtype == (np.float32 if k == 'loss_mask' else np.int32)
    segs = _segments(batch)
    assert len(segs) > rows                           # several instances share a row
    for r, a, b in segs:
      prompt, answer = next(stream)                   # nothing skipped, nothing reordered
      tokens = np.concatenate([prompt, answer, [tasks.EOS_ID]])
      assert np.array_equal(batch['inputs'][r, a:b], tokens)
      assert np.array_equal(batch['targets'][r, a:b - 1], tokens[1:])
      assert batch['targets'][r, b - 1] == tasks.PAD_ID
      assert np.array_equal(batch['positions'][r, a:b], np.arange(b - a))
      mask = np.zeros(b - a, np.float32)
      mask[len(prompt) - 1:len(prompt) + len(answer)] = 1.0
      assert np.array_equal(batch['loss_mask'][r, a:b], mask)
      on = batch['loss_mask'][r, a:b] == 1
      assert np.array_equal(batch['targets'][r, a:b][on], np.append(answer, tasks.EOS_ID))
    for r in range(rows):
      used = batch['segment_ids'][r] > 0
      end = used.sum()
      assert used[:end].all() and not used[end:].any()
      assert np.all(batch['inputs'][r, end:] == tasks.PAD_ID)
      assert np.all(batch['loss_mask'][r, end:] == 0)
    # Next-fit: a row is cut only where the next instance would not fit.
    ends = {r: b for r, _, b in segs}
    firsts = {r: b - a for r, a, b in reversed(segs)}
    for r in range(rows - 1):
      assert seq_len - ends[r] < firsts[r + 1]


def test_packing_is_reproducible_per_seed():
  spec = tasks.BindingSpec(chain=3, distractors=3)

  def take(seed):
    gen = tasks.train_batches(spec, batch_size=2, seq_len=64, seed=seed)
    return [next(gen) for _ in range(3)]

  a, b, c = take(0), take(0), take(1)
  for x, y in zip(a, b):
    assert all(np.array_equal(x[k], y[k]) for k in KEYS)
  assert not np.array_equal(a[0]['inputs'], c[0]['inputs'])


def test_pack_rows_finite_stream_and_bad_lengths():
  spec = tasks.AdditionSpec(digits=2)
  insts = _instances(spec, 5)
  batches = list(tasks.pack_rows(insts, rows=2, seq_len=24))
  assert len(batches) == 2 and len(_segments(batches[0])) + len(_segments(batches[1])) == 5
  with pytest.raises(ValueError):
    next(tasks.train_batches(spec, batch_size=1, seq_len=spec.max_len - 1, seed=0))
  with pytest.raises(ValueError):
    list(tasks.pack_rows(insts, rows=1, seq_len=5))


# ---------------------------------------------------------------------------------- held out


@pytest.mark.parametrize('spec', [tasks.PHopSpec(hops=4, length=32),
                                  tasks.AdditionSpec(digits=10)], ids=str)
def test_heldout_is_fixed_and_not_in_training(spec):
  held = tasks.heldout(spec, 200, seed=0)
  again = tasks.heldout(spec, 200, seed=0)
  assert all(np.array_equal(x[0], y[0]) for x, y in zip(held, again))
  keys = {tasks.instance_key(h) for h in held}
  assert len(keys) == 200
  train = tasks.train_instances(spec, seed=0)
  assert not keys & {tasks.instance_key(next(train)) for _ in range(10_000)}
  assert keys != {tasks.instance_key(h) for h in tasks.heldout(spec, 200, seed=1)}


def test_exclude_rejects_heldout_instances():
  # 100 possible one-digit sums: chance collisions are certain, so only `exclude` separates them.
  spec = tasks.AdditionSpec(digits=1)
  held = tasks.heldout(spec, 30, seed=0)
  keys = {tasks.instance_key(h) for h in held}
  plain, filtered = tasks.train_instances(spec, 0), tasks.train_instances(spec, 0, exclude=held)
  plain_keys = {tasks.instance_key(next(plain)) for _ in range(2000)}
  filtered_keys = {tasks.instance_key(next(filtered)) for _ in range(2000)}
  assert len(keys & plain_keys) == 30
  assert not keys & filtered_keys and len(filtered_keys) == 70
  with pytest.raises(ValueError):
    tasks.heldout(spec, 101)


def test_make_spec():
  assert tasks.make_spec('phop', hops=2) == tasks.PHopSpec(hops=2)
  assert tasks.make_spec('binding', chain=2).vocab.id('=') == 15
  with pytest.raises(ValueError):
    tasks.make_spec('sorting')
