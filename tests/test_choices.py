"""nfm_cli.choices: the solver's defaults are one fact, the same at every entry point."""
import inspect

import pytest

from nfm_cli import choices
from nfm_cli.api import measure_model
from nfm_cli.cli.measure_cmd import measure_command
from nfm_cli.cli.solve_variance_cmd import solve_variance_command
from nfm_cli.measures.compute import compute_measures
from nfm_cli.measures.variance import solve_layer
from nfm_cli.steps.measure import measure_checkpoint
from nfm_cli.steps.solve import solve_variance


@pytest.mark.parametrize("function", [solve_layer, compute_measures, solve_variance, measure_checkpoint, measure_model,
                                      measure_command, solve_variance_command])
def test_every_entry_point_defaults_to_the_solver_defaults(function):
    """The solver (eq. 17) runs with ``choices.SOLVER_TOL`` / ``SOLVER_MAX_ITER`` unless told otherwise,
    from Python, from a pipeline step and from the command line alike."""
    params = inspect.signature(function).parameters
    assert params["tol"].default == choices.SOLVER_TOL
    assert params["max_iter"].default == choices.SOLVER_MAX_ITER
