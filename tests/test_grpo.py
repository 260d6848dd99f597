"""GRPO (unimm.train.grpo): group advantages and the k3 KL by hand, the policy's log-probs
against the sampler's own code distribution, and two iterations of the CLI on a tiny
early-fusion model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.data import document as D
from unimm.errors import UserError
from unimm.sample import sampler_from_run
from unimm.train import grpo
from unimm.train.loop import Run

from test_image_slot import config


def test_group_advantages_and_kl_by_hand():
  adv = grpo.group_advantages([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0], 4)
  np.testing.assert_allclose(adv[:4], np.array([1, -1, -1, 1]) * 0.5 / (0.5 + grpo.ADV_EPS))
  assert not adv[4:8].any()  # a group of equal rewards teaches nothing
  std = np.sqrt(3) / 4  # rewards 1, 0, 0, 0: mean 1/4
  np.testing.assert_allclose(adv[8:], np.array([0.75, -0.25, -0.25, -0.25]) / (std + grpo.ADV_EPS))
  lp, ref = jnp.log(jnp.array([0.5, 0.25])), jnp.log(jnp.array([0.25, 0.25]))
  np.testing.assert_allclose(grpo.k3_kl(lp, ref), [0.5 - np.log(0.5) - 1, 0.0], rtol=1e-6)


@pytest.fixture(scope="module")
def init_run(tiny_tokenizers, tmp_path_factory):
  cfg = config(tiny_tokenizers, loss="next_token")
  workdir = tmp_path_factory.mktemp("xomni")
  run = Run(cfg, str(workdir), devices=jax.devices()[:1])
  state = run.trainer.init()  # (untrained: the checks need a model, not a good one)
  run.ckpt.save(0, state, run.data, force=True)
  run.ckpt.wait()
  (workdir / "config.json").write_text(cfg.to_json())
  return cfg, run, state, str(workdir)


def test_policy_logprobs_are_the_samplers_code_distribution(init_run):
  """log pi of sampled codes, teacher-forced (`code_logprobs`), equals the log-softmax the KV
  cached sampler drew each code from (recorded from its logits)."""
  cfg, run, state, _ = init_run
  s = sampler_from_run(run, state)
  s.cfg = cfg.copy_and_resolve_references()
  s.cfg.sample.update(cfg_scale=1.0, image_temperature=1.0, image_top_k=0)
  seen, guided = [], s._guided_codes
  s._guided_codes = lambda c, u: seen.append(np.asarray(guided(c, u))) or guided(c, u)
  prompts = ["a red circle", "a blue square"]
  cond = [D.document("t2i", [D.text(x), D.image(s._blank(), "target")]) for x in prompts]
  codes = s.next_token_codes(cond, [], seed=4)
  p = run.patcher
  want = np.stack([jax.nn.log_softmax(l, -1) for l in seen], 1)  # [R, N, codes]
  want = np.take_along_axis(want, (codes - p.code_offset)[..., None], -1)[..., 0]
  b, at = grpo.policy_batch(run.tokenizer, p, prompts, codes)
  got = grpo.code_logprobs(s._model(s.params), jax.tree.map(jnp.asarray, b), jnp.asarray(at),
                           p.code_offset, p.num_codes, 1.0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_grpo_cli_runs_iterations_and_checkpoints(init_run, tmp_path):
  """Two iterations of 2 prompts x 2 samples: a row each in grpo.jsonl (KL 0 at the first:
  the policy starts as the reference), a checkpoint that the sampler reads."""
  _, _, _, init = init_run
  out = tmp_path / "grpo"
  small = ["--config.grpo.steps=2", "--config.grpo.prompts=2", "--config.grpo.group=2",
           "--config.grpo.lr=0.01", "--no_eval"]
  grpo.main(["--init", init, "--workdir", str(out)] + small)  # the config: init's config.json
  rows = [json.loads(line) for line in (out / "grpo.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[1]["kl"] >= 0
  assert 0 <= rows[0]["reward"] <= 1
  from unimm.sample import load_sampler
  restored = jax.tree.leaves(load_sampler(str(out)).params)  # the training checkpoint format
  assert restored and all(np.isfinite(np.asarray(x)).all() for x in restored)
  with pytest.raises(UserError, match="--init WORKDIR"):
    grpo.main(["--workdir", str(tmp_path / "x")] + small)
