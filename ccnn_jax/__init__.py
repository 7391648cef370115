"""ccnn_jax: Constrained CNNs (Pathak et al. 2015) in JAX.

The constrained latent solver is a pure function of arrays::

    from ccnn_jax import LinearConstraints, solve, dual_objective, latent_distribution
"""

from ccnn_jax import constraints
from ccnn_jax.constraints import LinearConstraints
from ccnn_jax.dual import certificate, dual_objective, latent_distribution
from ccnn_jax.solvers import Solution, SolveInfo, solve, solve_batch

__all__ = [
    "LinearConstraints",
    "Solution",
    "SolveInfo",
    "certificate",
    "constraints",
    "dual_objective",
    "latent_distribution",
    "solve",
    "solve_batch",
]
