"""python -m unimm.train --config configs/demo.py [--config.KEY=VALUE ...] --workdir DIR [--resume] [--no_eval]

Trains (continuing from the workdir's latest checkpoint, if any), then runs
ShapesEval: prints the scores and writes eval.json and samples.png.
"""

import json

from unimm.distributed import initialize
from unimm.errors import UserError, cli


def main(argv):
  from unimm.config import parse_args
  cfg, opts = parse_args(argv, flags=("workdir",), switches=("resume", "no_eval"))
  if not opts["workdir"]:
    raise UserError("--workdir DIR is required")
  initialize()  # a multi-host job (UNIMM_DISTRIBUTED=1, set by launch/): unimm.distributed
  import jax
  from etils import epath
  from unimm.data.pipeline import describe_mixture
  from unimm.train.loop import Run, routing_report
  run = Run(cfg, opts["workdir"])  # (model.init_from fills the architecture fields first)
  workdir = epath.Path(run.workdir)  # local or gs://
  lead = jax.process_index() == 0  # the one process that prints and writes files
  if lead:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(cfg.to_json(indent=1))
  state = run.restore_or_init(require=opts["resume"])
  if lead:
    print(f"step {int(state['step'])} of {cfg.train.steps}; mesh {dict(run.mesh.shape)}; "
          f"{jax.process_count()} process(es); workdir {run.workdir}", flush=True)
    for line in describe_mixture(cfg):
      print(line, flush=True)
  state = run.train(state)
  if run.preempted:  # checkpointed: the next start in this workdir resumes (exit status 0)
    if lead:
      print(f"preempted at step {int(state['step'])}: run the same command again to resume",
            flush=True)
    return
  if cfg.model.moe.experts:
    report = routing_report(run, state)
    if lead:
      (workdir / "routing.json").write_text(json.dumps(report, indent=1))
      print(f"expert load max/mean per MoE block over {report['batches']} batches: "
            f"{report['max_over_mean_per_block']}", flush=True)
  if not opts["no_eval"]:
    from unimm.eval.run import evaluate  # (scipy and the sampler: not imported for --no_eval)
    from unimm.sample import sampler_from_run
    evaluate(sampler_from_run(run, state), cfg, run.workdir)


if __name__ == "__main__":
  cli(main)
