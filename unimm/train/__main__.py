"""python -m unimm.train --config configs/demo.py [--config.KEY=VALUE ...] --workdir DIR [--resume] [--no_eval]

Trains (continuing from the workdir's latest checkpoint, if any), then runs
ShapesEval: prints the scores and writes eval.json and samples.png.
"""

import json
import os

from unimm.errors import UserError, cli


def init_distributed():
  """Multi-host runs (UNIMM_DISTRIBUTED=1, set by the launch/ scripts) join one JAX job."""
  if os.environ.get("UNIMM_DISTRIBUTED") != "1":
    return
  import jax
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):  # GPU hosts: launch/gpu.sh
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                               int(os.environ["NNODES"]), int(os.environ["NODE_RANK"]))
  else:  # TPU pods and SLURM: auto-detected
    jax.distributed.initialize()


def main(argv):
  from unimm.config import parse_args
  cfg, opts = parse_args(argv, flags=("workdir",), switches=("resume", "no_eval"))
  if not opts["workdir"]:
    raise UserError("--workdir DIR is required")
  init_distributed()
  from unimm.data.pipeline import describe_mixture
  from unimm.eval.run import evaluate
  from unimm.sample import sampler_from_run
  from unimm.train.loop import Run, routing_report
  os.makedirs(opts["workdir"], exist_ok=True)
  run = Run(cfg, opts["workdir"])  # (model.init_from fills the architecture fields first)
  with open(os.path.join(opts["workdir"], "config.json"), "w") as f:
    f.write(cfg.to_json(indent=1))
  state = run.restore_or_init(require=opts["resume"])
  print(f"step {int(state['step'])} of {cfg.train.steps}; mesh {dict(run.mesh.shape)}; "
        f"workdir {run.workdir}", flush=True)
  for line in describe_mixture(cfg):
    print(line, flush=True)
  state = run.train(state)
  if cfg.model.moe.experts:
    report = routing_report(run, state)
    with open(os.path.join(run.workdir, "routing.json"), "w") as f:
      json.dump(report, f, indent=1)
    print(f"expert load max/mean per MoE block over {report['batches']} batches: "
          f"{report['max_over_mean_per_block']}", flush=True)
  if not opts["no_eval"]:
    evaluate(sampler_from_run(run, state), cfg, run.workdir)


if __name__ == "__main__":
  cli(main)
