//! Storage for the engine's tables: slots with small, stable indices, and values that many
//! pods share (label sets, policy lists, named ports), kept once and referred to by index so
//! that a pod's record stays small and the shared values stay in cache.

use std::collections::HashMap;
use std::hash::Hash;

/// Slots with a free list, so indices stay small and stable.
#[derive(Debug)]
pub(crate) struct Slab<T> {
    pub(crate) items: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    pub(crate) fn insert(&mut self, v: T) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.items[i as usize] = Some(v);
                i
            }
            None => {
                self.items.push(Some(v));
                u32::try_from(self.items.len() - 1).expect("fewer than 2^32 objects")
            }
        }
    }

    pub(crate) fn remove(&mut self, i: u32) -> Option<T> {
        let v = self.items.get_mut(i as usize)?.take();
        if v.is_some() {
            self.free.push(i);
        }
        v
    }

    #[inline]
    pub(crate) fn get(&self, i: u32) -> Option<&T> {
        self.items.get(i as usize)?.as_ref()
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.items.get_mut(i as usize)?.as_mut()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, v)| Some((i as u32, v.as_ref()?)))
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }
}

/// Values stored once with a count of their users, by index.
#[derive(Debug)]
pub(crate) struct Shared<T> {
    ids: HashMap<T, u32>,
    slots: Slab<(T, u32)>,
}

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Self {
            ids: HashMap::new(),
            slots: Slab::default(),
        }
    }
}

impl<T: Hash + Eq + Clone> Shared<T> {
    /// The index of `v`, stored if new; the caller becomes one of its users.
    pub(crate) fn acquire(&mut self, v: T) -> u32 {
        if let Some(&i) = self.ids.get(&v) {
            if let Some((_, users)) = self.slots.get_mut(i) {
                *users += 1;
            }
            return i;
        }
        let i = self.slots.insert((v.clone(), 1));
        self.ids.insert(v, i);
        i
    }

    /// One user of `i` is gone; the value is dropped with its last user.
    pub(crate) fn release(&mut self, i: u32) {
        let Some((_, users)) = self.slots.get_mut(i) else {
            return;
        };
        *users -= 1;
        if *users == 0
            && let Some((v, _)) = self.slots.remove(i)
        {
            self.ids.remove(&v);
        }
    }

    /// The value at `i`.
    #[inline]
    pub(crate) fn get(&self, i: u32) -> Option<&T> {
        self.slots.get(i).map(|(v, _)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_values_live_as_long_as_their_users() {
        let mut s = Shared::default();
        let a = s.acquire("a".to_string());
        assert_eq!(s.acquire("a".to_string()), a);
        let b = s.acquire("b".to_string());
        assert_ne!(a, b);
        s.release(a);
        assert_eq!(s.get(a).map(String::as_str), Some("a"));
        s.release(a);
        assert_eq!(s.get(a), None);
        // The slot is reused, and the old value is not found under its name any more.
        let c = s.acquire("c".to_string());
        assert_eq!(c, a);
        assert_eq!(s.acquire("a".to_string()), 2);
    }
}
