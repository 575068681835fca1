"""Scaling laws: fit them to runs, sweep small models to get the runs, plan a large run from the fits.

- `powerlaw`: L(x) = E + A·x^(−α) and y = k·x^a, with bootstrap intervals (machinery in `fit`).
- `isoflop`: Chinchilla approach 1 (min-loss envelope of training curves) and approach 2 (IsoFLOP
  profiles, arg-min and parabola), N_opt ∝ C^a and D_opt ∝ C^b.
- `parametric`: Chinchilla approach 3, L(N, D) = E + A/N^α + B/D^β (Huber on log-loss, L-BFGS from
  a grid), and the compute-optimal allocation it implies.
- `hparams`: optimal learning rate and batch size against compute (DeepSeek-LLM style).
- `runs`: tables of runs from CSV/JSON; `shapes`: concrete model shapes and the sweep grid;
  `sweep`: training the grid with the Trainer; `planner`: budget -> model, tokens, batch, LR, loss;
  `plots`: the figures. CLI: `lmforge scaling fit|plan|sweep`.

Importing this package imports nothing heavy; each module is imported on use.
"""
