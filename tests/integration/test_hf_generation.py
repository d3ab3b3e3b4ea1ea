"""The generation checks transformers' `GenerationTesterMixin` runs on a decoder-only model, written
out for the exported PLT (the mixin's source is not in transformers' sdist, so it cannot be loaded
the way tests/integration/test_hf_mixins.py loads `ModelTesterMixin`).

Each check runs on the three tiny PLTs of test_hf_contract.py (R=2 hidden gate, R=3 query gate
with MQA, vanilla R=2), with windows small enough for the ring to wrap while generating:
  - greedy, sampling and beam search with `return_dict_in_generate`: the sequences, scores, raw
    logits, hidden states and attentions have the counts and shapes transformers documents, and
    greedy's raw logits are the full forward's logits at every generated position;
  - `num_return_sequences` for sampling and beam search; beam scores are sorted;
  - generating from `inputs_embeds` continues exactly as from the ids;
  - `min_new_tokens` holds EOS back; after EOS a row holds padding;
  - `use_cache=False` gives the cached tokens; the returned cache has the sequence's length;
  - `logits_to_keep` keeps the last logits, equal to the full forward's;
  - caches PLT cannot use (static, quantized, offloaded) are refused with the reason.
Cache continuation, assisted and prompt-lookup refusal, left padding and beam reordering are in
test_hf_contract.py and test_export.py.
"""
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# one_thread: test_hf_contract's module-wide autouse fixture, used here too.
# pylint: disable-next=g-import-not-at-top,wrong-import-position,unused-import
from test_hf_contract import CONFIGS, make_torch, one_thread, tokens  # noqa: F401

NEW = 7  # generated tokens: past every ring's wrap


def gen(model, ids, **kw):
  base = dict(max_new_tokens=NEW, pad_token_id=0, eos_token_id=None, do_sample=False)
  with torch.no_grad():
    return model.generate(ids, attention_mask=torch.ones_like(ids), **{**base, **kw})


@pytest.mark.parametrize('name', list(CONFIGS))
def test_greedy_dict_outputs_have_the_documented_shapes_and_the_forward_logits(name):
  model = make_torch(name, seed=1)
  c = model.config
  ids = tokens((2, 5), seed=2)
  out = gen(model, ids, return_dict_in_generate=True, output_scores=True, output_logits=True,
            output_hidden_states=True, output_attentions=True)
  assert out.sequences.shape == (2, 5 + NEW)
  assert len(out.scores) == len(out.logits) == NEW
  assert all(s.shape == (2, c.vocab_size) for s in out.scores + out.logits)
  with torch.no_grad():
    full = model(out.sequences).logits
  for i, step_logits in enumerate(out.logits):
    np.testing.assert_allclose(step_logits.numpy(), full[:, 5 + i - 1].numpy(),
                               rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out.sequences[:, 5:].numpy(),
                                torch.stack([s.argmax(-1) for s in out.scores], 1).numpy())
  # One entry per generation step; each holds the per-loop tuples of the forward.
  r, layers = c.plt_num_loops, c.num_hidden_layers
  assert len(out.hidden_states) == len(out.attentions) == NEW
  assert len(out.hidden_states[0]) == r * (layers + 1)
  assert out.hidden_states[0][0].shape == (2, 5, c.hidden_size)
  assert all(h.shape == (2, 1, c.hidden_size) for h in out.hidden_states[1])
  assert len(out.attentions[0]) == r * layers
  assert out.attentions[0][0].shape[:3] == (2, c.num_attention_heads, 5)
  assert out.attentions[-1][0].shape[:3] == (2, c.num_attention_heads, 1)


@pytest.mark.parametrize('name', list(CONFIGS))
def test_sampling_returns_several_sequences_per_prompt_reproducibly(name):
  model = make_torch(name, seed=3)
  ids = tokens((2, 4), seed=4)
  runs = []
  for _ in range(2):
    torch.manual_seed(7)
    runs.append(gen(model, ids, do_sample=True, top_k=0, num_return_sequences=3,
                    return_dict_in_generate=True, output_scores=True))
  a, b = runs
  assert a.sequences.shape == (6, 4 + NEW)
  np.testing.assert_array_equal(a.sequences.numpy(), b.sequences.numpy())
  np.testing.assert_array_equal(a.sequences[:, :4].numpy(), ids.repeat_interleave(3, 0).numpy())
  assert len(a.scores) == NEW and a.scores[0].shape == (6, model.config.vocab_size)
  assert len({tuple(s) for s in a.sequences[:, 4:].tolist()}) > 1  # not one sample repeated


@pytest.mark.parametrize('name', list(CONFIGS))
def test_beam_search_returns_sorted_beams(name):
  model = make_torch(name, seed=5)
  ids = tokens((2, 4), seed=6)
  out = gen(model, ids, num_beams=3, num_return_sequences=2, return_dict_in_generate=True,
            output_scores=True, length_penalty=1.0)
  assert out.sequences.shape == (4, 4 + NEW)
  assert out.sequences_scores.shape == (4,)
  s = out.sequences_scores.view(2, 2)
  assert (s[:, 0] >= s[:, 1]).all()
  # A beam's score is its summed log-probability over the generated tokens divided by their
  # count (length penalty 1).
  with torch.no_grad():
    logp = torch.log_softmax(model(out.sequences).logits.float(), -1)
  seq = out.sequences
  token_lp = logp[:, 3:-1].gather(-1, seq[:, 4:, None])[..., 0].sum(-1)
  np.testing.assert_allclose(out.sequences_scores.numpy(), (token_lp / NEW).numpy(),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', list(CONFIGS))
def test_generate_from_inputs_embeds_continues_as_from_ids(name):
  model = make_torch(name, seed=8)
  ids = tokens((2, 6), seed=9)
  from_ids = gen(model, ids)
  with torch.no_grad():
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=NEW, pad_token_id=0, eos_token_id=None,
                                 do_sample=False)
  # Decoder-only generate from embeddings returns the new tokens only.
  np.testing.assert_array_equal(from_embeds.numpy(), from_ids[:, 6:].numpy())


def test_min_new_tokens_and_padding_after_eos():
  model = make_torch('r2_hidden', seed=10)
  ids = tokens((2, 5), seed=11)
  free = gen(model, ids)
  eos = int(free[0, 5 + 1])  # a token row 0 generates at its second step
  stopped = gen(model, ids, eos_token_id=eos)
  row = stopped[0, 5:].tolist()
  first = row.index(eos)
  assert first <= 1 and all(t == 0 for t in row[first + 1:])
  held = gen(model, ids, eos_token_id=eos, min_new_tokens=NEW)
  assert held.shape[1] == 5 + NEW and eos not in held[:, 5:].tolist()[0]


@pytest.mark.parametrize('name', list(CONFIGS))
def test_without_cache_equals_with_cache_and_the_cache_has_the_length(name):
  model = make_torch(name, seed=12)
  ids = tokens((2, 5), seed=13)
  cached = gen(model, ids, return_dict_in_generate=True)
  plain = gen(model, ids, use_cache=False)
  np.testing.assert_array_equal(cached.sequences.numpy(), plain.numpy())
  cache = cached.past_key_values
  assert cache.get_seq_length() == 5 + NEW - 1  # the last token is generated, not yet read


@pytest.mark.parametrize('keep', [1, 3])
def test_logits_to_keep_keeps_the_last_logits(keep):
  model = make_torch('r3_query', seed=14)
  ids = tokens((2, 8), seed=15)
  with torch.no_grad():
    full = model(ids).logits
    kept = model(ids, logits_to_keep=keep).logits
  assert kept.shape == (2, keep, model.config.vocab_size)
  np.testing.assert_allclose(kept.numpy(), full[:, -keep:].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', ['static', 'offloaded_static', 'offloaded', 'quantized'])
def test_caches_plt_cannot_use_are_refused(impl):
  model = make_torch('r2_hidden', seed=16)
  ids = tokens((1, 4), seed=17)
  with pytest.raises(ValueError, match=f'PLT does not support cache_implementation={impl!r}'):
    gen(model, ids, cache_implementation=impl)
