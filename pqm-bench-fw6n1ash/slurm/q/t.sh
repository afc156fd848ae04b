#!/bin/bash
exec /work/main/.venv/bin/python -m pqm.slurm /work/main/pqm-bench-fw6n1ash/slurm/q/t.tasks.json "$SLURM_ARRAY_TASK_ID" 1
