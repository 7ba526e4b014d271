//! The rules for namespaces, the one mutable value: one stays in a variable and is used through
//! its attributes, is never put in a container, another namespace or a call's arguments (where
//! growing it would grow a value measured earlier), holds no namespace itself, and stays within
//! the value limit as its attributes are set.

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Value};

use super::size::{Measure, SCALAR_BYTES, SLOT_BYTES};
use super::{pairs, GuardState, ValueMap};

impl GuardState {
    /// `{% set ns.name = value %}`: the value holds no namespace (so none contains itself) and
    /// the namespace stays within the value limit. Returns `[ns, value]`, sealed.
    pub(super) fn set_attr(&mut self, args: &[Value]) -> Result<Value, Error> {
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
    pub(super) fn is_namespace(&mut self, value: &Value) -> bool {
        if value.kind() != ValueKind::Map || value.downcast_object_ref::<ValueMap>().is_some() {
            return false;
        }
        self.visits = self.visits.saturating_add(self.namespaces.len() as u64);
        self.namespaces
            .iter()
            .any(|ns| minijinja::tests::is_sameas(ns, value))
    }
}

fn entry_bytes(key: &Value, value: Measure) -> u64 {
    (2 * SLOT_BYTES)
        .saturating_add(key.as_bytes().map_or(SCALAR_BYTES, |b| b.len() as u64))
        .saturating_add(value.bytes)
}

pub(super) fn namespace_error() -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        "a namespace can only be kept in a variable and used through its attributes (not put \
         in a list, map or other namespace, nor passed to a filter, function or macro)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_costs_its_two_slots_its_key_and_its_value() {
        let value = Measure {
            bytes: 100,
            height: 0,
        };
        assert_eq!(
            entry_bytes(&Value::from("name"), value),
            2 * SLOT_BYTES + 4 + 100
        );
        // A key that is not a string counts as a scalar.
        assert_eq!(
            entry_bytes(&Value::from(7), value),
            2 * SLOT_BYTES + SCALAR_BYTES + 100
        );
        let huge = Measure {
            bytes: u64::MAX,
            height: 0,
        };
        assert_eq!(entry_bytes(&Value::from("k"), huge), u64::MAX);
    }
}
