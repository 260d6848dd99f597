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
  # PPO's clip: rho 1.5 with A > 0 counts 1.2 A; rho 0.5 with A < 0 counts -0.8 |A|; rho 0.9 with
  # A > 0 and rho 1.1 with A < 0 count as they are (the min keeps the worse of the two)
  old = jnp.zeros((2, 2))
  got = grpo.clipped_surrogate(jnp.log(jnp.array([[1.5, 0.9], [0.5, 1.1]])), old,
                               jnp.array([2.0, -1.0]), 0.2)
  np.testing.assert_allclose(got, [[2.4, 1.8], [-0.8, -1.1]], rtol=1e-6)
  # grpo.top_blocks: the head, the final norm and the last blocks of the stack
  params = {"embed": 0, "blocks": {i: {"attn": 0, "mlp": 0} for i in range(3)},
            "final_norm": {"scale": 0}, "lm_head": 0}
  assert grpo.trainable(params, 1) == {"embed": False, "final_norm": {"scale": True}, "lm_head": True,
                                       "blocks": {0: {"attn": False, "mlp": False},
                                                  1: {"attn": False, "mlp": False},
                                                  2: {"attn": True, "mlp": True}}}
  assert all(jax.tree.leaves(grpo.trainable(params, -1)))
  del params["lm_head"]  # tied embeddings: the token table is the head
  assert grpo.trainable(params, 0)["embed"] and not grpo.trainable(params, 0)["blocks"][2]["mlp"]


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
  """Two iterations of 2 prompts x 2 samples, two updates each (the second on PPO's clipped
  ratio), rewarded off the VQ decoder's images, only the head trained: a row each
  in grpo.jsonl (KL 0 at the first: the policy starts as the reference), a checkpoint of the 4
  updates that the sampler reads, the blocks and embeddings still the reference's."""
  _, _, state, init = init_run
  out = tmp_path / "grpo"
  small = ["--config.grpo.steps=2", "--config.grpo.prompts=2", "--config.grpo.group=2",
           "--config.grpo.lr=0.01", "--config.grpo.reward_render=vq", "--config.grpo.updates=2",
           "--config.grpo.top_blocks=0", "--no_eval"]
  grpo.main(["--init", init, "--workdir", str(out)] + small)  # the config: init's config.json
  rows = [json.loads(line) for line in (out / "grpo.jsonl").read_text().splitlines()]
  assert [r["iteration"] for r in rows] == [1, 2]
  assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[1]["kl"] >= 0
  assert 0 <= rows[0]["reward"] <= 1
  from unimm.sample import load_sampler
  assert max(int(d.name) for d in (out / "checkpoints").iterdir() if d.name.isdigit()) == 4
  restored = load_sampler(str(out)).params  # the training checkpoint format
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
  flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  start, train = flat(state["params"]), flat(grpo.trainable(state["params"], 0))
  moved = {k for k, v in flat(restored).items() if np.any(np.asarray(v) != np.asarray(start[k]))}
  assert moved <= {k for k, t in train.items() if t} and any("lm_head" in k for k in moved)
  assert not any("blocks" in k or "embed" in k for k in moved)
  with pytest.raises(UserError, match="--init WORKDIR"):
    grpo.main(["--workdir", str(tmp_path / "x")] + small)
  with pytest.raises(UserError, match="grpo.reward_render='pixels': use 'model' or 'vq'"):
    grpo.main(["--init", init, "--workdir", str(tmp_path / "y"), "--config.grpo.reward_render=pixels"])
  with pytest.raises(UserError, match="grpo.top_blocks=0 picks blocks of an unscanned stack"):
    grpo.main(["--init", init, "--workdir", str(tmp_path / "z"), "--config.model.scan=True",
               "--config.grpo.top_blocks=0"])


def test_policy_scores_average_the_draws_over_every_one_object_scene():
  """The rollout-setting eval scores ShapesEval's 162 one-object prompts (each colour x shape x
  position once) at seeds seed and seed + 1 and averages: a policy right at even seeds only
  scores 0.5."""
  from unimm.data import shapes
  from unimm.eval.shapes_eval import ShapesEval
  truth = {shapes.caption(s): s for s in ShapesEval(seed=6, image_size=32, n_single=162).single}
  assert len(truth) == 162

  class Half:
    def text_to_image(self, prompts, seed):
      if seed % 2:
        return np.zeros((len(prompts), 32, 32, 3), np.uint8)
      return np.stack([shapes.render(truth.get(p) or [], 32) for p in prompts])

  got = grpo.policy_scores(Half(), grpo.policy_bench(32, 6), seed=6)
  assert got["t2i_single/all"] == pytest.approx(0.5) and got["t2i_single/color"] == pytest.approx(0.5)
  assert "t2i_double/objects" in got and not any(k.startswith(("chance/", "oracle/")) for k in got)
