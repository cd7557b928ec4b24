//! Interned strings and label sets, so that selector matching compares integers.

use std::collections::HashMap;

use smallvec::SmallVec;

use crate::model::Labels;

/// An interned string.
pub(crate) type Sym = u32;

/// Interns label keys, label values and port names. Strings are never freed: their number is
/// bounded by the distinct strings the clusters use.
#[derive(Debug, Default)]
pub(crate) struct Interner {
    map: HashMap<Box<str>, Sym>,
    strings: Vec<Box<str>>,
}

impl Interner {
    /// The symbol of `s`, allocating one if new.
    pub(crate) fn intern(&mut self, s: &str) -> Sym {
        if let Some(&sym) = self.map.get(s) {
            return sym;
        }
        let sym = Sym::try_from(self.strings.len()).expect("fewer than 2^32 distinct strings");
        self.strings.push(s.into());
        self.map.insert(s.into(), sym);
        sym
    }

    /// The string of `sym`.
    pub(crate) fn resolve(&self, sym: Sym) -> &str {
        self.strings.get(sym as usize).map_or("", |s| s)
    }
}

/// Labels as (key, value) symbols sorted by key, inline for the usual few labels so that a
/// pod's labels share its cache lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct LabelSet(SmallVec<[(Sym, Sym); 4]>);

impl LabelSet {
    /// Interns `labels`.
    pub(crate) fn new(labels: &Labels, interner: &mut Interner) -> Self {
        let mut v: SmallVec<[(Sym, Sym); 4]> = labels
            .iter()
            .map(|(k, val)| (interner.intern(k), interner.intern(val)))
            .collect();
        v.sort_unstable_by_key(|&(k, _)| k);
        Self(v)
    }

    /// The (key, value) pairs.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Sym, Sym)> + '_ {
        self.0.iter().copied()
    }

    /// The value of key `k`.
    #[inline]
    pub(crate) fn get(&self, k: Sym) -> Option<Sym> {
        // Label sets are small: a linear scan beats a binary search.
        self.0.iter().find(|&&(key, _)| key == k).map(|&(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_stable() {
        let mut i = Interner::default();
        let a = i.intern("a");
        assert_eq!(i.intern("a"), a);
        assert_ne!(i.intern("b"), a);
        assert_eq!(i.resolve(1), "b");
        let l = LabelSet::new(&Labels::from([("b".into(), "a".into())]), &mut i);
        assert_eq!(l.get(i.intern("b")), Some(a));
        assert_eq!(l.get(a), None);
    }
}
