"""`python -m lottery run --grid DIR` (also `mpiexec -n N python -m mpi4py -m lottery run ...`)."""
from lottery.cli import main

raise SystemExit(main())
