"""The one validation layer: every check of user input that an entry point makes.

Entry points (``accumulate``, the train steps, ``multi_steps``, the Flax and NNX steps,
``optax_compat``) call these checks; what stays beside them is tied to their own running
(a Flax error translated into the corrected call, a ``Reduction``'s own ``check``). Two
moments:

* at construction, what the options show: counts, flags, numbers, dtypes, functions
  against the calls they will get, argument positions and names (``arguments``,
  ``values``);
* at trace time, what only a call shows: batch shapes, the state passed in, what the
  user's functions return (``trees``, ``steps``, ``states``).

Every message names the argument as the user wrote it (``state.opt_state``,
``batch_argnums``), the leaf path where there is a tree (``state.opt_state[0].mu['b']``),
what is allowed, and the fix. Each raises ``TypeError`` for a value of the wrong kind and
``ValueError`` for the right kind with a wrong value. Classes of the front-ends that a check
needs (a ``TrainState``, ``nnx.Module``) are passed in: this package imports no front-end.

Modules, by what they check:

* ``arguments``: callables and their signatures, argument positions, names and roles, and
  the options naming reductions or collections;
* ``values``: options that are one value (k, ints, numbers, flags, dtypes, keys, axes,
  weights, loss-scale settings, schedules, optimizers);
* ``trees``: trees against the layout they must keep, arrays, trainable params, what a
  loss or step returns;
* ``steps``: what a call shows: carried state, ``optax_compat``'s batch arguments,
  ``multi_steps``' per-call values (staged under ``jax.jit``), the unsplit-argument note;
* ``states``: the state a step is given, per front-end.
"""

from jaxaccum._checks.arguments import WEIGHT_FN_FIX as WEIGHT_FN_FIX
from jaxaccum._checks.arguments import check_aux_reduce as check_aux_reduce
from jaxaccum._checks.arguments import check_disjoint as check_disjoint
from jaxaccum._checks.arguments import check_functions as check_functions
from jaxaccum._checks.arguments import check_in_range as check_in_range
from jaxaccum._checks.arguments import check_reduction as check_reduction
from jaxaccum._checks.arguments import collection_options as collection_options
from jaxaccum._checks.arguments import function as function
from jaxaccum._checks.arguments import names_some as names_some
from jaxaccum._checks.arguments import option_items as option_items
from jaxaccum._checks.states import dynamic_scale as dynamic_scale
from jaxaccum._checks.states import flax_state as flax_state
from jaxaccum._checks.states import flax_variables as flax_variables
from jaxaccum._checks.states import flush_window as flush_window
from jaxaccum._checks.states import model_state_given as model_state_given
from jaxaccum._checks.states import multi_steps_state as multi_steps_state
from jaxaccum._checks.states import nnx_init as nnx_init
from jaxaccum._checks.states import nnx_objects as nnx_objects
from jaxaccum._checks.states import train_state as train_state
from jaxaccum._checks.steps import accumulator as accumulator
from jaxaccum._checks.steps import batch_size as batch_size
from jaxaccum._checks.steps import call_weight as call_weight
from jaxaccum._checks.steps import calls_per_update as calls_per_update
from jaxaccum._checks.steps import compat_axes as compat_axes
from jaxaccum._checks.steps import fun_output as fun_output
from jaxaccum._checks.steps import micro_grad_call as micro_grad_call
from jaxaccum._checks.steps import micro_vmap_call as micro_vmap_call
from jaxaccum._checks.steps import microbatch_call as microbatch_call
from jaxaccum._checks.steps import require as require
from jaxaccum._checks.steps import skip_verdict as skip_verdict
from jaxaccum._checks.steps import unpack_state as unpack_state
from jaxaccum._checks.steps import unsplit_hint as unsplit_hint
from jaxaccum._checks.trees import ARRAY_TYPES as ARRAY_TYPES
from jaxaccum._checks.trees import Wording as Wording
from jaxaccum._checks.trees import carried_state as carried_state
from jaxaccum._checks.trees import check_layout as check_layout
from jaxaccum._checks.trees import check_opt_state as check_opt_state
from jaxaccum._checks.trees import collection_layout as collection_layout
from jaxaccum._checks.trees import given_arrays as given_arrays
from jaxaccum._checks.trees import reducible as reducible
from jaxaccum._checks.trees import reduction_carry as reduction_carry
from jaxaccum._checks.trees import returned_arrays as returned_arrays
from jaxaccum._checks.trees import returned_model_state as returned_model_state
from jaxaccum._checks.trees import split_loss as split_loss
from jaxaccum._checks.trees import step_outputs as step_outputs
from jaxaccum._checks.trees import trainable as trainable
from jaxaccum._checks.values import check_accum_dtype as check_accum_dtype
from jaxaccum._checks.values import check_in_axes as check_in_axes
from jaxaccum._checks.values import check_k as check_k
from jaxaccum._checks.values import check_key as check_key
from jaxaccum._checks.values import check_num_real as check_num_real
from jaxaccum._checks.values import check_unroll as check_unroll
from jaxaccum._checks.values import check_weight as check_weight
from jaxaccum._checks.values import flag as flag
from jaxaccum._checks.values import loss_scale_config as loss_scale_config
from jaxaccum._checks.values import optimizer as optimizer
from jaxaccum._checks.values import out_axes as out_axes
from jaxaccum._checks.values import positive_int as positive_int
from jaxaccum._checks.values import real_number as real_number
from jaxaccum._checks.values import schedule as schedule
