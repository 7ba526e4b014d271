//! Bounds on what one step of a chat template can cost, on top of minijinja's fuel.
//!
//! minijinja charges fuel for every instruction and for the strings and list slots it creates,
//! but a list or map costs only its own slots, not the values it holds: `[x, x]` costs two slots
//! whatever the size of `x`, so doubling a list of lists forty times costs 80 slots and makes a
//! value with 2^40 leaves. Lists repeated with `*` or joined with `+` stay lazy and cost nothing
//! (`[0] * 10**8` is a 100M-item list). Whatever then walks such a value (printing it, `~`,
//! `|string`, `|tojson`, comparisons, unpacking, the 33rd nested `+`) allocates or works in
//! proportion to its full size before anything is charged, and values nested thousands deep (or
//! chains of lazy slices of slices) overflow the stack when walked or dropped.
//!
//! So the compiled template is instrumented: guard calls are inserted around the instructions
//! that create values or walk them ([`instrument`] matches every instruction of minijinja's VM, so
//! a new one does not compile until it is classified). The guards keep this invariant: every
//! value the template makes is eager (a lazy sequence is copied as it is created, into a list or
//! into an iterable that behaves as the lazy one did; `chain`, whose maps are lazy views, is
//! replaced), at most [`MAX_DEPTH`](size::MAX_DEPTH) deep, and at most `value_limit` bytes when fully expanded
//! (strings, plus a slot per item), shared parts counted every time they occur. A namespace, the
//! one mutable value, stays in variables and is used through its attributes, so that growing one
//! cannot grow a value measured earlier. Then every single operation works on at most a few
//! `value_limit`s of data, and the fuel bounds how many operations run.
//!
//! What fuel does not pay for (a comparison or a hash walks its operands uncharged, so a loop
//! comparing two large values costs far more time than fuel) is bounded by a deadline, checked
//! after each such operation.
//!
//! The parts: `instructions` inserts the guard calls into the compiled code; `size` measures and
//! seals the values they see; `namespace` keeps namespaces where they cannot grow a measured
//! value; `filters` replaces the filters whose output can outgrow their input in one step; and
//! `folding` bounds what minijinja computes while compiling, before any of these run. This file
//! installs the guards for a render and holds their shared state.
//!
//! It stands on minijinja's unstable machinery (compiled instructions, the AST), which is why
//! minijinja is pinned exactly (`=3.1.0`). Upgrading it, check:
//! 1. `instructions`: every new or changed `Instruction` (the match is exhaustive, so a new one
//!    does not compile): does it create a value, walk one, or take arguments? Guard it so.
//! 2. `folding`: the AST's new expressions and statements (also exhaustive), and which
//!    expressions the code generator folds with `as_const`, and how often, against
//!    `Folding::compile`.
//! 3. Fuel: what minijinja now charges for (strings, list slots, lazy sequences). A lazy kind
//!    that becomes charged needs no copy; a new lazy kind (a new `ObjectRepr`, a new iterator
//!    value) must be sealed by `size`.
//! 4. Built-in filters, functions and tests: any new one whose output can outgrow its input
//!    in one step (as `tojson`'s indent or `format`'s widths did) gets a bounded version in
//!    `filters`.
//! 5. Namespaces (`namespace()`'s object type, `is_sameas`) and `groupby`'s grouper attribute,
//!    which `namespace` and `size` recognise by shape.
//! 6. Then the hostile templates (`tests/test_template_limits.py`, `chat_template`'s tests) and
//!    the `chat_template` fuzz target for 30 minutes (CONTRIBUTING.md).

mod filters;
mod folding;
mod instructions;
mod namespace;
mod size;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use minijinja::value::{from_args, Object, ObjectRepr, ValueOrKwargs};
use minijinja::{Environment, Error, ErrorKind, State, Value};

pub(super) use filters::add_bounded_filters;
pub(super) use folding::check_constant_folding;
pub(super) use instructions::instrument;
use size::Measure;

/// Guard names have a space, so no template can name, call or shadow them.
const SEAL: &str = "guard seal";
const ARGS: &str = "guard args";
const SPLAT_ARGS: &str = "guard splat args";
const SET_ATTR: &str = "guard set attr";

/// Measuring visits values; this many visits cost one fuel (an instruction's worth).
const VISITS_PER_FUEL: u64 = 16;

/// Adds the guards (and a `namespace` that records the namespaces it makes) to `env`, for one
/// render: no value may expand to more than `value_limit` bytes, and the render must end
/// within `time_limit` from now.
pub(super) fn install(env: &mut Environment<'_>, value_limit: u64, time_limit: Duration) {
    let state = Arc::new(Mutex::new(GuardState::new(value_limit)));
    let deadline = Instant::now() + time_limit;
    for (name, kind) in [
        (SEAL, Kind::Seal),
        (ARGS, Kind::Args),
        (SPLAT_ARGS, Kind::SplatArgs),
        (SET_ATTR, Kind::SetAttr),
        ("namespace", Kind::Namespace),
    ] {
        env.add_global(
            name,
            Value::from_object(Guard {
                kind,
                state: state.clone(),
                deadline,
                time_limit,
            }),
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Seal,
    Args,
    SplatArgs,
    SetAttr,
    Namespace,
}

struct Guard {
    kind: Kind,
    state: Arc<Mutex<GuardState>>,
    deadline: Instant,
    time_limit: Duration,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.kind)
    }
}

impl Object for Guard {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn call(self: &Arc<Self>, state: &mut State<'_, '_>, args: &[Value]) -> Result<Value, Error> {
        // A poisoned lock means a panic already failed this render.
        let mut guard = self
            .state
            .lock()
            .map_err(|_| Error::new(ErrorKind::InvalidOperation, "template guard poisoned"))?;
        if Instant::now() > self.deadline {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "rendering took longer than {} s",
                    self.time_limit.as_secs_f32()
                ),
            ));
        }
        let result = match self.kind {
            Kind::Seal => guard.seal(args),
            Kind::Args => guard
                .check_args(args)
                .map(|()| args.iter().rev().cloned().collect()),
            Kind::SplatArgs => guard.check_args(args).map(|()| Value::from(args.to_vec())),
            Kind::SetAttr => guard.set_attr(args),
            Kind::Namespace => {
                let (defaults,): (Option<ValueOrKwargs>,) = from_args(args)?;
                let namespace = minijinja::functions::namespace(defaults)?;
                guard.namespaces.push(namespace.clone());
                Ok(namespace)
            }
        };
        let fuel = std::mem::take(&mut guard.visits).div_ceil(VISITS_PER_FUEL);
        drop(guard);
        state.consume_fuel(fuel)?;
        result
    }
}

/// What the guards of one render share.
struct GuardState {
    /// The most bytes any one value may expand to.
    value_limit: u64,
    /// The namespaces this render made (`namespace()` is the only maker).
    namespaces: Vec<Value>,
    /// Large sealed lists, maps, tuples and copies by address: they never change, so they are
    /// measured once.
    measured: HashMap<usize, Measure>,
    /// Keeps the values behind `measured` alive, so that no address is reused.
    pinned: Vec<Value>,
    /// Values visited since fuel was last charged for them.
    visits: u64,
}

impl GuardState {
    fn new(value_limit: u64) -> Self {
        Self {
            value_limit,
            namespaces: Vec::new(),
            measured: HashMap::new(),
            pinned: Vec::new(),
            visits: 0,
        }
    }
}

/// minijinja's own map type (`{...}`, `dict()`, maps from Rust).
type ValueMap = BTreeMap<Value, Value>;

/// The entries of a map-like object.
fn pairs(value: &Value) -> Result<Vec<(Value, Value)>, Error> {
    let mut out = Vec::new();
    for key in value.try_iter()?.checked() {
        let key = key?;
        let item = value.get_item(&key)?;
        out.push((key, item));
    }
    Ok(out)
}
