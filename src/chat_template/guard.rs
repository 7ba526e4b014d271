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
//! replaced), at most [`MAX_DEPTH`] deep, and at most `value_limit` bytes when fully expanded
//! (strings, plus a slot per item), shared parts counted every time they occur. A namespace, the
//! one mutable value, stays in variables and is used through its attributes, so that growing one
//! cannot grow a value measured earlier. Then every single operation works on at most a few
//! `value_limit`s of data, and the fuel bounds how many operations run.
//!
//! What fuel does not pay for (a comparison or a hash walks its operands uncharged, so a loop
//! comparing two large values costs far more time than fuel) is bounded by a deadline, checked
//! after each such operation.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use minijinja::machinery::{ast, Instruction, Instructions};
use minijinja::value::{
    from_args, Enumerator, Kwargs, Object, ObjectExt, ObjectRepr, Rest, Tuple, ValueKind,
    ValueOrKwargs,
};
use minijinja::{Environment, Error, ErrorKind, State, Value};

/// Guard names have a space, so no template can name, call or shadow them.
const SEAL: &str = "guard seal";
const ARGS: &str = "guard args";
const SPLAT_ARGS: &str = "guard splat args";
const SET_ATTR: &str = "guard set attr";

/// How deep values may nest: chat templates handle messages (two levels) and the odd tool
/// schema; the engine's walks recurse once per level.
pub(super) const MAX_DEPTH: u32 = 64;

/// The size of a list slot and of a map entry's two slots, as minijinja's fuel counts them; a
/// number, `none` or a plain object (a function, a macro) counts as a short string.
const SLOT_BYTES: u64 = 32;
const SCALAR_BYTES: u64 = 8;

/// Measuring visits values; this many visits cost one fuel (an instruction's worth).
const VISITS_PER_FUEL: u64 = 16;

/// Sealed values this large are remembered by address, so that passing a list of all the
/// messages around does not walk it again each time.
const REMEMBERED_BYTES: u64 = 4 << 10;

/// Returns `code` with the guards in place: the same instructions in the same order, jump
/// targets moved to the guards now in front of their targets.
pub(super) fn instrument<'s>(code: &Instructions<'s>) -> Result<Instructions<'s>, Error> {
    let mut expanded = Vec::new();
    let mut starts = Vec::new();
    let mut next = 0u32;
    for index in 0.. {
        let Some(instruction) = code.get(index) else {
            break;
        };
        let sequence = guarded(instruction.clone())?;
        starts.push(next);
        next += sequence.len() as u32;
        expanded.push((index, sequence));
    }
    starts.push(next);
    let moved = |target: u32| starts.get(target as usize).copied().unwrap_or(next);

    let mut out = Instructions::new(code.name(), code.source());
    for (index, sequence) in expanded {
        let line = code.get_line(index).and_then(|l| u16::try_from(l).ok());
        for instruction in sequence {
            let instruction = match instruction {
                Instruction::Jump(t) => Instruction::Jump(moved(t)),
                Instruction::JumpIfFalse(t) => Instruction::JumpIfFalse(moved(t)),
                Instruction::JumpIfFalseOrPop(t) => Instruction::JumpIfFalseOrPop(moved(t)),
                Instruction::JumpIfTrueOrPop(t) => Instruction::JumpIfTrueOrPop(moved(t)),
                Instruction::Iterate(t) => Instruction::Iterate(moved(t)),
                Instruction::BuildMacro(name, t, flags) => {
                    Instruction::BuildMacro(name, moved(t), flags)
                }
                other => other,
            };
            match line {
                Some(line) => out.add_with_line(instruction, line),
                None => out.add(instruction),
            };
        }
    }
    Ok(out)
}

/// `instruction` with the guards it needs before and after it.
fn guarded(instruction: Instruction<'_>) -> Result<Vec<Instruction<'_>>, Error> {
    use Instruction as I;
    let seal = I::CallFunction(SEAL, Some(1));
    Ok(match instruction {
        // Values bigger than their fuel: lazy repetition and concatenation, slices (lazy views
        // that chain), containers of shared values.
        I::BuildList(_) | I::BuildTuple(_) | I::Add | I::Mul | I::Slice => {
            vec![instruction, seal]
        }
        // A map compares its keys as it is built.
        I::BuildMap(pairs) => {
            let values = u16::try_from(pairs.saturating_mul(2))
                .map_err(|_| Error::new(ErrorKind::InvalidOperation, "map literal too large"))?;
            let mut v = check_args(Some(values));
            v.extend([instruction, seal]);
            v
        }
        // Filters, functions, methods and macros get arguments of bounded size and no
        // namespace (a view over one would grow with it), and their results are sealed.
        I::ApplyFilter(_, args, _)
        | I::CallFunction(_, args)
        | I::CallMethod(_, args)
        | I::CallObject(args) => {
            let mut v = check_args(args);
            v.extend([instruction, seal]);
            v
        }
        // Uncharged work (comparing, hashing, a test's comparisons): the deadline is checked.
        I::Eq
        | I::Ne
        | I::Gt
        | I::Gte
        | I::Lt
        | I::Lte
        | I::CompareAndPreserve(_)
        | I::In
        | I::GetItem
        | I::PerformTest(..) => vec![instruction, seal],
        // `{% set ns.attr = value %}`: [value, ns] on the stack.
        I::SetAttr(name) => vec![
            I::LoadConst(Value::from(name)),
            I::CallFunction(SET_ATTR, Some(3)),
            I::UnpackList(2),
            instruction,
        ],
        // Other templates would run unguarded; a chat template is a single template anyway.
        I::Include(_) | I::LoadBlocks | I::ExportLocals | I::FastSuper => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "include, import and extends are not supported in chat templates",
            ))
        }
        // Charged by fuel as they go, or a bounded amount of work on guarded values.
        I::EmitRaw(_)
        | I::StoreLocal(_)
        | I::Lookup(_)
        | I::GetAttr(_)
        | I::LoadConst(_)
        | I::BuildKwargs(_)
        | I::MergeKwargs(_)
        | I::UnpackList(_)
        | I::UnpackLists(_)
        | I::Sub
        | I::Div
        | I::IntDiv
        | I::Rem
        | I::Pow
        | I::Neg
        | I::Not
        | I::StringConcat
        | I::Emit
        | I::PushLoop(_)
        | I::PushWith
        | I::Iterate(_)
        | I::PushDidNotIterate
        | I::PopFrame
        | I::PopLoopFrame
        | I::Jump(_)
        | I::JumpIfFalse(_)
        | I::JumpIfFalseOrPop(_)
        | I::JumpIfTrueOrPop(_)
        | I::PushAutoEscape
        | I::PopAutoEscape
        | I::BeginCapture(_)
        | I::EndCapture
        | I::DupTop
        | I::DiscardTop
        | I::FastRecurse
        | I::Swap
        | I::CallBlock(_)
        | I::BuildMacro(..)
        | I::Return
        | I::IsUndefined
        | I::Enclose(_)
        | I::GetClosure => vec![instruction],
    })
}

/// Checks the arguments of a call on the stack and puts them back: `args` of them, or as many
/// as the count on top of the stack says (a call with `*args`).
fn check_args<'s>(args: Option<u16>) -> Vec<Instruction<'s>> {
    match args {
        Some(0) => Vec::new(),
        // The guard returns them last first: unpacking pushes the first item last.
        Some(n) => vec![
            Instruction::CallFunction(ARGS, Some(n)),
            Instruction::UnpackList(n as usize),
        ],
        // Unpacking lists pushes their items in order, then their count.
        None => vec![
            Instruction::CallFunction(SPLAT_ARGS, None),
            Instruction::UnpackLists(1),
        ],
    }
}

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

/// The items of a container, sealed; whether sealing changed any; their total.
struct Visited<T> {
    items: Vec<T>,
    changed: bool,
    measure: Measure,
}

/// How big a value is and how deep it nests below itself.
#[derive(Clone, Copy)]
struct Measure {
    bytes: u64,
    height: u32,
}

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

    fn seal(&mut self, args: &[Value]) -> Result<Value, Error> {
        let value = args.first().cloned().unwrap_or_default();
        let (sealed, _) = self.visit(&value, 0, false, true)?;
        Ok(sealed.unwrap_or(value))
    }

    /// Arguments of a call: no namespaces, and all of them together within the value limit
    /// (a macro gets its extra arguments as one list, `varargs`).
    fn check_args(&mut self, args: &[Value]) -> Result<(), Error> {
        let mut bytes = 0u64;
        for arg in args {
            if self.is_namespace(arg) {
                return Err(namespace_error());
            }
            let (_, measure) = self.visit(arg, 1, true, false)?;
            bytes = bytes.saturating_add(measure.bytes);
            self.check_size(bytes)?;
        }
        Ok(())
    }

    /// `{% set ns.name = value %}`: the value holds no namespace (so none contains itself) and
    /// the namespace stays within the value limit. Returns `[ns, value]`, sealed.
    fn set_attr(&mut self, args: &[Value]) -> Result<Value, Error> {
        let [value, namespace, name] = args else {
            return Err(Error::from(ErrorKind::InvalidOperation));
        };
        let (sealed, measure) = self.visit(value, 1, true, true)?;
        let value = sealed.unwrap_or_else(|| value.clone());
        if self.is_namespace(namespace) {
            let mut bytes = entry_bytes(name, measure);
            for (key, other) in pairs(namespace)? {
                if key != *name {
                    let (_, other) = self.visit(&other, 1, true, false)?;
                    bytes = bytes.saturating_add(entry_bytes(&key, other));
                    self.check_size(bytes)?;
                }
            }
            self.check_size(bytes)?;
        }
        Ok(Value::from(vec![namespace.clone(), value]))
    }

    /// Whether `value` is one of this render's namespaces; each comparison counts as a visit,
    /// so that making many namespaces costs fuel where it slows this down.
    fn is_namespace(&mut self, value: &Value) -> bool {
        if value.kind() != ValueKind::Map || value.downcast_object_ref::<ValueMap>().is_some() {
            return false;
        }
        self.visits = self.visits.saturating_add(self.namespaces.len() as u64);
        self.namespaces
            .iter()
            .any(|ns| minijinja::tests::is_sameas(ns, value))
    }

    fn check_size(&self, bytes: u64) -> Result<(), Error> {
        if bytes > self.value_limit {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "the template built a value of more than {} bytes (a list repeated or \
                     joined with itself, or many copies of one value)",
                    self.value_limit
                ),
            ));
        }
        Ok(())
    }

    /// Measures `value` at `depth` (`nested`: inside a container or namespace) and returns it
    /// sealed if that changed it: lazy sequences (at any depth) become copies. `keep`: the copy
    /// will be used (arguments are only measured, and passed on as they are).
    fn visit(
        &mut self,
        value: &Value,
        depth: u32,
        nested: bool,
        keep: bool,
    ) -> Result<(Option<Value>, Measure), Error> {
        self.visits += 1;
        let leaf = |bytes: usize| {
            Ok((
                None,
                Measure {
                    bytes: bytes as u64,
                    height: 0,
                },
            ))
        };
        match value.kind() {
            ValueKind::String | ValueKind::Bytes => {
                return leaf(value.as_bytes().map_or(0, <[u8]>::len))
            }
            ValueKind::Undefined | ValueKind::None | ValueKind::Bool | ValueKind::Number => {
                return leaf(SCALAR_BYTES as usize)
            }
            ValueKind::Invalid => {
                return Err(Error::new(ErrorKind::InvalidOperation, value.to_string()))
            }
            // Objects (sequences, maps, iterables, plain objects): measured below.
            _ => {}
        }
        if depth > MAX_DEPTH {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("the template nested values more than {MAX_DEPTH} deep"),
            ));
        }
        let address = eager_address(value);
        if let Some(measure) = address.and_then(|a| self.measured.get(&a)).copied() {
            self.check_depth(depth, measure)?;
            return Ok((None, measure));
        }

        let (sealed, measure) = if let Some(items) = value.downcast_object_ref::<Vec<Value>>() {
            let v = self.visit_items(items.iter().cloned().map(Ok), depth, keep)?;
            (v.changed.then(|| Value::from(v.items)), v.measure)
        } else if let Some(tuple) = value.downcast_object_ref::<Tuple>() {
            let v = self.visit_items(tuple.iter().cloned().map(Ok), depth, keep)?;
            (
                v.changed.then(|| Value::from(Tuple::from(v.items))),
                v.measure,
            )
        } else if let Some(copied) = value.downcast_object_ref::<Copied>() {
            let v = self.visit_items(copied.items.iter().cloned().map(Ok), depth, keep)?;
            let len_known = copied.len_known;
            let copy = || {
                Value::from_object(Copied {
                    items: v.items,
                    len_known,
                })
            };
            (v.changed.then(copy), v.measure)
        } else if let Some(map) = value.downcast_object_ref::<ValueMap>() {
            let entries = map.iter().map(|(k, v)| (k.clone(), v.clone()));
            let v = self.visit_pairs(entries, depth, keep)?;
            let map = || Value::from_object(v.items.into_iter().collect::<ValueMap>());
            (v.changed.then(map), v.measure)
        } else if self.is_namespace(value) {
            if nested {
                return Err(namespace_error());
            }
            let entries = pairs(value)?.into_iter();
            (None, self.visit_pairs(entries, depth, keep)?.measure)
        } else {
            match value.as_object().map(|o| o.repr()) {
                // Other maps are not lazy (the `chain` filter, whose maps are, is replaced):
                // messages, `loop`, keyword arguments, a macro's attributes.
                Some(ObjectRepr::Map) => {
                    let entries = pairs(value)?.into_iter();
                    (None, self.visit_pairs(entries, depth, keep)?.measure)
                }
                // `groupby`'s groups: `(grouper, list)` with those two attributes; copying them
                // would lose the attributes, and they are not lazy.
                Some(ObjectRepr::Seq)
                    if value.get_attr("grouper").is_ok_and(|g| !g.is_undefined()) =>
                {
                    let items = value.try_iter()?.checked();
                    (None, self.visit_items(items, depth, keep)?.measure)
                }
                // Lazy sequences (repetitions, concatenations, slices, ranges, filters' results):
                // copied, refused before copying when their length is already too much. The
                // copy keeps the kind and the known or unknown length, which decide how the
                // engine prints, indexes and tests it.
                Some(repr @ (ObjectRepr::Seq | ObjectRepr::Iterable)) => {
                    let len = value.len();
                    if let Some(len) = len {
                        self.check_size((len as u64).saturating_mul(SLOT_BYTES))?;
                    }
                    let v = self.visit_items(value.try_iter()?.checked(), depth, keep)?;
                    let copy = match repr {
                        ObjectRepr::Seq => Value::from(v.items),
                        _ => Value::from_object(Copied {
                            items: v.items,
                            len_known: len.is_some(),
                        }),
                    };
                    (Some(copy), v.measure)
                }
                // Functions and the like: they print as their name.
                _ => return leaf(SCALAR_BYTES as usize),
            }
        };
        self.check_depth(depth, measure)?;
        // Remembered: the value itself if sealing left it as it was, or its copy if that is
        // kept; large ones only, small ones are quick to measure again.
        let remembered = match &sealed {
            None => Some(value),
            Some(copy) => keep.then_some(copy),
        };
        if let Some(remembered) = remembered.filter(|_| measure.bytes >= REMEMBERED_BYTES) {
            if let Some(address) = eager_address(remembered) {
                self.measured.insert(address, measure);
                self.pinned.push(remembered.clone());
            }
        }
        Ok((sealed, measure))
    }

    /// The items of a sequence at `depth`, visited.
    fn visit_items(
        &mut self,
        items: impl Iterator<Item = Result<Value, Error>>,
        depth: u32,
        keep: bool,
    ) -> Result<Visited<Value>, Error> {
        let mut out = Vec::new();
        let mut changed = false;
        let mut total = Measure {
            bytes: 0,
            height: 0,
        };
        for item in items {
            let item = item?;
            let (sealed, measure) = self.visit(&item, depth + 1, true, keep)?;
            changed |= sealed.is_some();
            out.push(sealed.unwrap_or(item));
            total.bytes = total
                .bytes
                .saturating_add(SLOT_BYTES)
                .saturating_add(measure.bytes);
            total.height = total.height.max(measure.height + 1);
            self.check_size(total.bytes)?;
        }
        Ok(Visited {
            items: out,
            changed,
            measure: total,
        })
    }

    /// The entries of a map at `depth`, visited.
    fn visit_pairs(
        &mut self,
        pairs: impl Iterator<Item = (Value, Value)>,
        depth: u32,
        keep: bool,
    ) -> Result<Visited<(Value, Value)>, Error> {
        let mut out = Vec::new();
        let mut changed = false;
        let mut total = Measure {
            bytes: 0,
            height: 0,
        };
        for (key, value) in pairs {
            let (sealed_key, key_measure) = self.visit(&key, depth + 1, true, keep)?;
            let (sealed_value, value_measure) = self.visit(&value, depth + 1, true, keep)?;
            changed |= sealed_key.is_some() || sealed_value.is_some();
            out.push((sealed_key.unwrap_or(key), sealed_value.unwrap_or(value)));
            total.bytes = total
                .bytes
                .saturating_add(2 * SLOT_BYTES)
                .saturating_add(key_measure.bytes)
                .saturating_add(value_measure.bytes);
            total.height = total
                .height
                .max(key_measure.height.max(value_measure.height) + 1);
            self.check_size(total.bytes)?;
        }
        Ok(Visited {
            items: out,
            changed,
            measure: total,
        })
    }

    fn check_depth(&self, depth: u32, measure: Measure) -> Result<(), Error> {
        if depth.saturating_add(measure.height) > MAX_DEPTH {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("the template nested values more than {MAX_DEPTH} deep"),
            ));
        }
        Ok(())
    }
}

/// minijinja's own map type (`{...}`, `dict()`, maps from Rust).
type ValueMap = BTreeMap<Value, Value>;

/// A lazy iterable's items, copied: it iterates, prints and compares like the iterable it
/// replaces (its length is known if that one's was), but holds its items.
struct Copied {
    items: Vec<Value>,
    len_known: bool,
}

impl std::fmt::Debug for Copied {
    /// What the engine prints for an iterable of unknown length, like the lazy ones.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("<iterator>").finish()
    }
}

impl Object for Copied {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Iterable
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_enumerator(|this| Box::new(this.items.iter().cloned()))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        self.len_known.then_some(self.items.len())
    }
}

/// The address of an eager list, tuple, map or copy: these never change once made.
fn eager_address(value: &Value) -> Option<usize> {
    if let Some(v) = value.downcast_object_ref::<Vec<Value>>() {
        Some(v as *const Vec<Value> as usize)
    } else if let Some(t) = value.downcast_object_ref::<Tuple>() {
        Some(t as *const Tuple as usize)
    } else if let Some(c) = value.downcast_object_ref::<Copied>() {
        Some(c as *const Copied as usize)
    } else {
        value
            .downcast_object_ref::<ValueMap>()
            .map(|m| m as *const ValueMap as usize)
    }
}

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

fn entry_bytes(key: &Value, value: Measure) -> u64 {
    (2 * SLOT_BYTES)
        .saturating_add(key.as_bytes().map_or(SCALAR_BYTES, |b| b.len() as u64))
        .saturating_add(value.bytes)
}

fn namespace_error() -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        "a namespace can only be kept in a variable and used through its attributes (not put \
         in a list, map or other namespace, nor passed to a filter, function or macro)",
    )
}

/// The widest `tojson` indentation: each line is indented by it times its depth.
const MAX_JSON_INDENT: i64 = 8;

/// minijinja charges this many fuel units (1/64 fuel) per byte of serialized output.
const SERIALIZED_UNITS_PER_BYTE: usize = 16;

/// Output a formatting call may add beyond its format string and twice its arguments.
const FORMAT_SLACK: usize = 64 << 10;

/// Replaces the filters and methods whose result can outgrow their arguments many times over
/// in one step, before fuel is charged for it (`tojson`'s indentation, format strings that
/// repeat an argument or ask for a wide field), and `chain`, whose chained maps are views that
/// can be chained again without end.
pub(super) fn add_bounded_filters(env: &mut Environment<'_>) {
    env.add_filter("tojson", tojson);
    env.add_filter("format", printf_format);
    env.add_filter("chain", chain);
    env.set_unknown_method_callback(|state, value, method, args| {
        if let (Some(format), "format") = (value.as_str(), method) {
            check_format(format, Style::StrFormat, args)?;
        }
        minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
    });
}

fn tojson(
    state: &State<'_, '_>,
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let requested = match &indent {
        Some(indent) => Some(indent.clone()),
        None => kwargs.peek::<Option<Value>>("indent")?,
    };
    // `indent=true` means 2; other values are widths, refused by minijinja if not numbers.
    if let Some(width) = requested.filter(|v| v.is_number()).and_then(|v| v.as_i64()) {
        if width > MAX_JSON_INDENT {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: the indent can be at most {MAX_JSON_INDENT}"),
            ));
        }
    }
    let json = minijinja::filters::tojson(value, indent, kwargs)?;
    let bytes = json.as_str().map_or(0, str::len);
    state.consume_fuel((bytes * SERIALIZED_UNITS_PER_BYTE / 64) as u64)?;
    Ok(json)
}

/// `chain` with maps made into one map at once: the same keys (sorted) and values (the last
/// defined one) as minijinja's chained view.
fn chain(state: &State<'_, '_>, value: Value, others: Rest<Value>) -> Result<Value, Error> {
    if value.kind() != ValueKind::Map || others.iter().any(|v| v.kind() != ValueKind::Map) {
        return minijinja::filters::chain(state, value, others);
    }
    let mut merged = ValueMap::new();
    for map in std::iter::once(&value).chain(others.iter()) {
        for (key, item) in pairs(map)? {
            if !item.is_undefined() || !merged.contains_key(&key) {
                merged.insert(key, item);
            }
        }
    }
    Ok(Value::from_object(merged))
}

fn printf_format(
    state: &mut State<'_, '_>,
    format: &Value,
    args: Rest<ValueOrKwargs>,
) -> Result<Value, Error> {
    if let Some(string) = format.as_str() {
        let values: Vec<Value> = args.iter().map(|a| a.clone().into_value()).collect();
        check_format(string, Style::Printf, &values)?;
    }
    minijinja::filters::format(state, format, args)
}

#[derive(Clone, Copy)]
enum Style {
    /// `"%s"|format(x)`: minijinja checks widths itself.
    Printf,
    /// `"{}".format(x)` (Python's `str.format`).
    StrFormat,
}

/// Refuses a format string whose output could be far bigger than its inputs: every field may
/// print the longest argument (fields can name the same argument again and again), padded to
/// the widest width asked for; a width or precision taken from an argument (`{:{}}`) is
/// refused outright.
fn check_format(format: &str, style: Style, args: &[Value]) -> Result<(), Error> {
    let refuse = |why: &str| Err(Error::new(ErrorKind::InvalidOperation, why.to_string()));
    let bytes = format.as_bytes();
    let (mut fields, mut width) = (0usize, 0usize);
    let mut i = 0;
    while i < bytes.len() {
        match (style, bytes[i]) {
            (Style::Printf, b'%') | (Style::StrFormat, b'{')
                if bytes.get(i + 1) == Some(&bytes[i]) =>
            {
                i += 2;
                continue;
            }
            (Style::Printf, b'%') => fields += 1,
            (Style::StrFormat, b'{') => {
                fields += 1;
                let field = &format[i + 1..];
                let end = field.find('}').unwrap_or(field.len());
                let field = &field[..end];
                if field.contains('{') {
                    return refuse(
                        "str.format: widths and precisions taken from arguments are not supported",
                    );
                }
                let spec = field.split_once(':').map_or("", |(_, spec)| spec);
                for digits in spec.split(|c: char| !c.is_ascii_digit()) {
                    width = width.max(digits.parse().unwrap_or(if digits.is_empty() {
                        0
                    } else {
                        usize::MAX
                    }));
                }
                i += 1 + end;
            }
            _ => {}
        }
        i += 1;
    }
    let lengths: Vec<usize> = args
        .iter()
        .map(|a| a.as_str().map_or_else(|| a.to_string().len(), str::len))
        .collect();
    let longest = lengths.iter().copied().max().unwrap_or(0);
    let most = fields
        .saturating_mul(longest.saturating_add(width))
        .saturating_add(format.len());
    let allowed = lengths
        .iter()
        .fold(format.len().saturating_add(FORMAT_SLACK), |sum, &len| {
            sum.saturating_add(len.saturating_mul(2))
        });
    if most > allowed {
        return refuse(&format!(
            "format: the output could reach {most} bytes from {allowed} of input (fields \
             repeating an argument, or wide fields)"
        ));
    }
    Ok(())
}

/// What minijinja may compute while compiling a template: the sizes (in the units of
/// `value_limit`) of the operands and results of the operations it folds, each time it folds
/// them. Real templates fold a few short strings (`'=' * 80`).
const FOLDING_BUDGET: u64 = 1 << 20;

/// Refuses a template whose constant expressions would cost minijinja much work to fold while
/// compiling, before anything is charged: `[0] * 10**8` folds into a 100M-item list, a sum of
/// 33 of them is materialized, and comparing two of them walks them all. Folding follows
/// minijinja's code generator, which folds an expression (`Expr::as_const`) before compiling
/// it and again for every enclosing expression it compiles; this walks the parsed template the
/// same way, counting that work, and folds each operation once on its operands' values.
pub(super) fn check_constant_folding(
    source: &str,
    syntax: minijinja::syntax::SyntaxConfig,
) -> Result<(), Error> {
    let template = minijinja::machinery::parse(source, "chat_template", syntax)?;
    let mut folding = Folding {
        spent: 0,
        folded: HashMap::new(),
    };
    folding.statement(&template)
}

struct Folding {
    spent: u64,
    /// Each expression's value if it is constant, and the work of folding it, by address.
    folded: HashMap<usize, (Option<Value>, u64)>,
}

impl Folding {
    fn statement(&mut self, stmt: &ast::Stmt<'_>) -> Result<(), Error> {
        use ast::Stmt as S;
        match stmt {
            S::Template(t) => self.statements(&t.children),
            S::EmitExpr(e) => self.compile(&e.expr),
            S::EmitRaw(_) | S::Continue(_) | S::Break(_) => Ok(()),
            S::ForLoop(f) => {
                self.compile(&f.target)?;
                self.compile(&f.iter)?;
                if let Some(filter) = &f.filter_expr {
                    self.compile(filter)?;
                }
                self.statements(&f.body)?;
                self.statements(&f.else_body)
            }
            S::IfCond(i) => {
                self.compile(&i.expr)?;
                self.statements(&i.true_body)?;
                self.statements(&i.false_body)
            }
            S::WithBlock(w) => {
                for (target, value) in &w.assignments {
                    self.compile(target)?;
                    self.compile(value)?;
                }
                self.statements(&w.body)
            }
            S::Set(s) => {
                self.compile(&s.target)?;
                self.compile(&s.expr)
            }
            S::SetBlock(s) => {
                self.compile(&s.target)?;
                if let Some(filter) = &s.filter {
                    self.compile(filter)?;
                }
                self.statements(&s.body)
            }
            S::AutoEscape(a) => {
                self.compile(&a.enabled)?;
                self.statements(&a.body)
            }
            S::FilterBlock(f) => {
                self.compile(&f.filter)?;
                self.statements(&f.body)
            }
            S::Block(b) => self.statements(&b.body),
            S::Import(i) => {
                self.compile(&i.expr)?;
                self.compile(&i.name)
            }
            S::FromImport(i) => {
                self.compile(&i.expr)?;
                for (name, alias) in &i.names {
                    self.compile(name)?;
                    if let Some(alias) = alias {
                        self.compile(alias)?;
                    }
                }
                Ok(())
            }
            S::Extends(e) => self.compile(&e.name),
            S::Include(i) => self.compile(&i.name),
            S::Macro(m) => self.macro_decl(m),
            S::CallBlock(c) => {
                self.call(&c.call)?;
                self.macro_decl(&c.macro_decl)
            }
            S::Do(d) => self.call(&d.call),
        }
    }

    fn statements(&mut self, stmts: &[ast::Stmt<'_>]) -> Result<(), Error> {
        stmts.iter().try_for_each(|s| self.statement(s))
    }

    fn macro_decl(&mut self, m: &ast::Macro<'_>) -> Result<(), Error> {
        for e in m.args.iter().chain(&m.defaults) {
            self.compile(e)?;
        }
        self.statements(&m.body)
    }

    fn call(&mut self, call: &ast::Call<'_>) -> Result<(), Error> {
        self.compile(&call.expr)?;
        self.args(&call.args)
    }

    fn args(&mut self, args: &[ast::CallArg<'_>]) -> Result<(), Error> {
        for arg in args {
            match arg {
                ast::CallArg::Pos(e)
                | ast::CallArg::Kwarg(_, e)
                | ast::CallArg::PosSplat(e)
                | ast::CallArg::KwargSplat(e) => self.compile(e)?,
            }
        }
        Ok(())
    }

    /// Compiling an expression folds it; if it is not constant, its parts are compiled.
    fn compile(&mut self, expr: &ast::Expr<'_>) -> Result<(), Error> {
        use ast::Expr as E;
        let (value, work) = self.fold(expr)?;
        self.spend(work)?;
        if value.is_some() {
            return Ok(());
        }
        match expr {
            E::Var(_) | E::Const(_) => Ok(()),
            E::Slice(s) => {
                self.compile(&s.expr)?;
                for e in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                    self.compile(e)?;
                }
                Ok(())
            }
            E::UnaryOp(u) => self.compile(&u.expr),
            E::BinOp(b) => {
                self.compile(&b.left)?;
                self.compile(&b.right)
            }
            E::Compare(c) => {
                self.compile(&c.expr)?;
                c.ops.iter().try_for_each(|op| self.compile(&op.expr))
            }
            E::IfExpr(i) => {
                self.compile(&i.test_expr)?;
                self.compile(&i.true_expr)?;
                match &i.false_expr {
                    Some(e) => self.compile(e),
                    None => Ok(()),
                }
            }
            E::Filter(f) => {
                if let Some(e) = &f.expr {
                    self.compile(e)?;
                }
                self.args(&f.args)
            }
            E::Test(t) => {
                self.compile(&t.expr)?;
                self.args(&t.args)
            }
            E::GetAttr(g) => self.compile(&g.expr),
            E::GetItem(g) => {
                self.compile(&g.expr)?;
                self.compile(&g.subscript_expr)
            }
            E::Call(c) => self.call(c),
            E::List(l) => l.items.iter().try_for_each(|e| self.compile(e)),
            E::Tuple(t) => t.items.iter().try_for_each(|e| self.compile(e)),
            E::Map(m) => m
                .keys
                .iter()
                .chain(&m.values)
                .try_for_each(|e| self.compile(e)),
        }
    }

    /// `expr.as_const()` and the work it takes, computed once per expression: operations are
    /// folded on their operands' folded values, so that nothing is folded twice here.
    fn fold(&mut self, expr: &ast::Expr<'_>) -> Result<(Option<Value>, u64), Error> {
        use ast::Expr as E;
        let address = expr as *const ast::Expr<'_> as usize;
        if let Some(known) = self.folded.get(&address) {
            return Ok(known.clone());
        }
        let span = expr.span();
        let constant =
            |value: Value| ast::Expr::Const(ast::Spanned::new(ast::Const { value }, span));
        let folded = match expr {
            E::Const(c) => (Some(c.value.clone()), 0),
            // Only lists of literals fold, without folding their items again.
            E::List(_) | E::Tuple(_) | E::Map(_) => {
                let value = expr.as_const();
                let work = value.as_ref().map_or(0, |v| v.len().unwrap_or(0) as u64);
                (value, work)
            }
            E::UnaryOp(u) => {
                let (operand, work) = self.fold(&u.expr)?;
                let value = operand.and_then(|v| {
                    ast::Expr::UnaryOp(ast::Spanned::new(
                        ast::UnaryOp {
                            op: match u.op {
                                ast::UnaryOpKind::Not => ast::UnaryOpKind::Not,
                                ast::UnaryOpKind::Neg => ast::UnaryOpKind::Neg,
                            },
                            expr: constant(v),
                        },
                        span,
                    ))
                    .as_const()
                });
                (value, work)
            }
            E::BinOp(b) => {
                let (left, left_work) = self.fold(&b.left)?;
                let (right, right_work) = self.fold(&b.right)?;
                let mut work = left_work.saturating_add(right_work);
                let value = match (left, right) {
                    (Some(left), Some(right)) => {
                        work = work
                            .saturating_add(self.size(&left)?)
                            .saturating_add(self.size(&right)?);
                        let value = ast::Expr::BinOp(ast::Spanned::new(
                            ast::BinOp {
                                op: b.op,
                                left: constant(left),
                                right: constant(right),
                            },
                            span,
                        ))
                        .as_const();
                        if let Some(value) = &value {
                            work = work.saturating_add(self.size(value)?);
                        }
                        value
                    }
                    _ => None,
                };
                (value, work)
            }
            // Folding stops at the first operand that is not constant.
            E::Compare(c) => {
                let (first, mut work) = self.fold(&c.expr)?;
                let mut operands = Vec::new();
                let mut constant_ops = Vec::new();
                if let Some(first) = first {
                    work = work.saturating_add(self.size(&first)?);
                    operands.push(first);
                    for op in &c.ops {
                        let (operand, operand_work) = self.fold(&op.expr)?;
                        work = work.saturating_add(operand_work);
                        let Some(operand) = operand else {
                            break;
                        };
                        work = work.saturating_add(self.size(&operand)?);
                        constant_ops.push(ast::CompareOp {
                            op: op.op,
                            expr: constant(operand),
                        });
                    }
                }
                let value = match operands.pop() {
                    Some(first) if constant_ops.len() == c.ops.len() => {
                        ast::Expr::Compare(ast::Spanned::new(
                            ast::Compare {
                                expr: constant(first),
                                ops: constant_ops,
                            },
                            span,
                        ))
                        .as_const()
                    }
                    _ => None,
                };
                (value, work)
            }
            E::Var(_)
            | E::Slice(_)
            | E::IfExpr(_)
            | E::Filter(_)
            | E::Test(_)
            | E::GetAttr(_)
            | E::GetItem(_)
            | E::Call(_) => (None, 0),
        };
        self.folded.insert(address, folded.clone());
        Ok(folded)
    }

    fn spend(&mut self, work: u64) -> Result<(), Error> {
        self.spent = self.spent.saturating_add(work);
        if self.spent > FOLDING_BUDGET {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "the template's constant expressions are too large to compute (a constant \
                 list repeated or joined many times, or compared)",
            ));
        }
        Ok(())
    }

    /// A folded value's size, walking it only as far as the budget allows.
    fn size(&mut self, value: &Value) -> Result<u64, Error> {
        let mut state = GuardState::new(FOLDING_BUDGET.saturating_sub(self.spent));
        match state.visit(value, 0, false, false) {
            Ok((_, measure)) => Ok(measure.bytes),
            Err(_) => self.spend(u64::MAX).map(|()| 0),
        }
    }
}
