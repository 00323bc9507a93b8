//! The slot a single-flight computation publishes its result to: the first caller that misses a
//! cache for some key computes, and callers that miss the same key meanwhile block here for its
//! result instead of computing it again. Used by the image cache and the tokenization segment cache.

use std::sync::{Condvar, Mutex, PoisonError};

pub struct Flight<T> {
    result: Mutex<Option<T>>,
    done: Condvar,
}

impl<T> Default for Flight<T> {
    fn default() -> Self {
        Self { result: Mutex::new(None), done: Condvar::new() }
    }
}

impl<T: Clone> Flight<T> {
    /// Set the result and wake every waiter (called once, by the computing caller).
    pub fn publish(&self, result: T) {
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
        self.done.notify_all();
    }

    /// Block until the result is published; every waiter gets a clone.
    pub fn wait(&self) -> T {
        let mut slot = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(result) = slot.as_ref() {
                return result.clone();
            }
            slot = self.done.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn waiters_get_the_published_result() {
        let f = Arc::new(Flight::<u32>::default());
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let f = f.clone();
                std::thread::spawn(move || f.wait())
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        f.publish(7);
        for w in waiters {
            assert_eq!(w.join().unwrap(), 7);
        }
        assert_eq!(f.wait(), 7, "a late waiter returns at once");
    }
}
