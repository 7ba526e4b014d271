//! Measuring and sealing the values a template makes: each is walked, the lazy sequences in it
//! are copied (a lazy one costs no fuel whatever its size), and its full size and depth are
//! checked against the limits. Large values are remembered by address, so that passing them
//! around does not walk them again.

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectExt, ObjectRepr, Tuple, ValueKind};
use minijinja::{Error, ErrorKind, Value};

use super::namespace::namespace_error;
use super::{pairs, GuardState, ValueMap};

/// How deep values may nest: chat templates handle messages (two levels) and the odd tool
/// schema; the engine's walks recurse once per level.
pub(super) const MAX_DEPTH: u32 = 64;

/// The size of a list slot and of a map entry's two slots, as minijinja's fuel counts them; a
/// number, `none` or a plain object (a function, a macro) counts as a short string.
pub(super) const SLOT_BYTES: u64 = 32;
pub(super) const SCALAR_BYTES: u64 = 8;

/// Sealed values this large are remembered by address, so that passing a list of all the
/// messages around does not walk it again each time.
const REMEMBERED_BYTES: u64 = 4 << 10;

/// The items of a container, sealed; whether sealing changed any; their total.
struct Visited<T> {
    items: Vec<T>,
    changed: bool,
    measure: Measure,
}

/// How big a value is and how deep it nests below itself.
#[derive(Clone, Copy)]
pub(super) struct Measure {
    pub(super) bytes: u64,
    pub(super) height: u32,
}

impl GuardState {
    pub(super) fn seal(&mut self, args: &[Value]) -> Result<Value, Error> {
        let value = args.first().cloned().unwrap_or_default();
        let (sealed, _) = self.visit(&value, 0, false, true)?;
        Ok(sealed.unwrap_or(value))
    }

    /// Arguments of a call: no namespaces, and all of them together within the value limit
    /// (a macro gets its extra arguments as one list, `varargs`).
    pub(super) fn check_args(&mut self, args: &[Value]) -> Result<(), Error> {
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

    pub(super) fn check_size(&self, bytes: u64) -> Result<(), Error> {
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
    pub(super) fn visit(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn measure(limit: u64, value: &Value) -> Result<(Option<Value>, Measure), Error> {
        GuardState::new(limit).visit(value, 0, false, true)
    }

    #[test]
    fn strings_and_scalars_measure_their_bytes() {
        let (sealed, m) = measure(1 << 20, &Value::from("hello")).unwrap();
        assert!(sealed.is_none());
        assert_eq!((m.bytes, m.height), (5, 0));
        assert_eq!(
            measure(1 << 20, &Value::from(42)).unwrap().1.bytes,
            SCALAR_BYTES
        );
    }

    /// A shared value counts every time it occurs: two copies of a list cost twice one.
    #[test]
    fn containers_count_shared_parts_each_time() {
        let inner = Value::from(vec![Value::from("x".repeat(1000)); 4]);
        let one = measure(1 << 20, &inner).unwrap().1;
        let twice = measure(1 << 20, &Value::from(vec![inner.clone(), inner]))
            .unwrap()
            .1;
        assert!(one.bytes >= 4000, "{}", one.bytes);
        assert!(
            twice.bytes >= 2 * one.bytes,
            "{} against {}",
            twice.bytes,
            one.bytes
        );
        assert_eq!((one.height, twice.height), (1, 2));
    }

    #[test]
    fn values_over_the_limit_or_too_deep_are_refused() {
        let big = Value::from(vec![Value::from("y".repeat(1000)); 100]);
        assert!(measure(50_000, &big).is_err());
        measure(200_000, &big).unwrap();

        let mut deep = Value::from(0);
        for _ in 0..MAX_DEPTH + 2 {
            deep = Value::from(vec![deep]);
        }
        let err = measure(1 << 20, &deep).err().expect("too deep");
        assert!(err.to_string().contains("deep"), "{err}");
    }

    /// A lazy sequence (here a range) is sealed into an eager copy with the same items.
    #[test]
    fn lazy_sequences_are_copied() {
        let env = minijinja::Environment::new();
        let lazy = env
            .compile_expression("range(5)")
            .unwrap()
            .eval(())
            .unwrap();
        let (sealed, m) = measure(1 << 20, &lazy).unwrap();
        let sealed = sealed.expect("a range is lazy");
        let items: Vec<i64> = sealed
            .try_iter()
            .unwrap()
            .map(|v| i64::try_from(v).unwrap())
            .collect();
        assert_eq!(items, [0, 1, 2, 3, 4]);
        assert_eq!(m.bytes, 5 * (SLOT_BYTES + SCALAR_BYTES));
    }
}
