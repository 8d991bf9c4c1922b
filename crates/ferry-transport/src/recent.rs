//! The pages a post-copy session sent most recently, remembered the same
//! way on both ends so that a page whose content went over once is named,
//! not sent again (a lazy dump's memory is fetched page run by page run,
//! with no digest exchange ahead: see `migrate::post_copy`).
//!
//! Both ends number the pages sent in full, in the order they went, and
//! keep the last [`RECENT_PAGES`] of them: the source their digests, the
//! agent their bytes. Both see the same sequence, so both forget the same
//! pages; a page the source names by number is one the agent still holds.

use std::collections::{HashMap, VecDeque};

use ferry_image::page::{Digest, PageKey};

/// Pages remembered (16 MiB of them on the agent).
pub(crate) const RECENT_PAGES: usize = 4096;

/// The source's half: digests of the pages sent in full, by number.
#[derive(Debug)]
pub struct SentPages {
    key: PageKey,
    by_digest: HashMap<Digest, u64>,
    order: VecDeque<Digest>,
    next: u64,
}

impl SentPages {
    pub fn new(key: PageKey) -> SentPages {
        SentPages {
            key,
            by_digest: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
        }
    }

    /// The number of a page with this content still held on the agent, or
    /// `None` after recording it as sent in full now.
    pub fn reference_or_record(&mut self, bytes: &[u8]) -> Option<u64> {
        let d = self.key.digest(bytes);
        if let Some(&n) = self.by_digest.get(&d) {
            return Some(n);
        }
        self.by_digest.insert(d, self.next);
        self.order.push_back(d);
        self.next += 1;
        if self.order.len() > RECENT_PAGES {
            if let Some(old) = self.order.pop_front() {
                self.by_digest.remove(&old);
            }
        }
        None
    }
}

/// The agent's half: the bytes of the pages received in full, by number.
#[derive(Debug, Default)]
pub struct ReceivedPages {
    pages: VecDeque<Box<[u8]>>,
    /// The number of `pages[0]`.
    first: u64,
}

impl ReceivedPages {
    pub fn record(&mut self, bytes: &[u8]) {
        self.pages.push_back(bytes.into());
        if self.pages.len() > RECENT_PAGES {
            self.pages.pop_front();
            self.first += 1;
        }
    }

    /// The page numbered `n`, if still held.
    pub fn get(&self, n: u64) -> Option<&[u8]> {
        let i = usize::try_from(n.checked_sub(self.first)?).ok()?;
        self.pages.get(i).map(|b| &b[..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_halves_remember_and_forget_the_same_pages() {
        let mut sent = SentPages::new(PageKey::new([8; 32]));
        let mut received = ReceivedPages::default();
        let page = |n: u32| {
            let mut p = vec![0u8; ferry_sys::PAGE_SIZE];
            p[..4].copy_from_slice(&n.to_le_bytes());
            p
        };
        // Page contents 0..N+10, then content 5 again (forgotten by then)
        // and the latest one again (still held).
        let n = RECENT_PAGES as u32 + 10;
        for c in 0..n {
            assert_eq!(sent.reference_or_record(&page(c)), None);
            received.record(&page(c));
        }
        assert_eq!(sent.reference_or_record(&page(5)), None);
        received.record(&page(5));
        let last = sent.reference_or_record(&page(n - 1)).expect("held");
        assert_eq!(received.get(last), Some(&page(n - 1)[..]));
        assert_eq!(received.get(0), None);
        let again = sent.reference_or_record(&page(5)).expect("held");
        assert_eq!(received.get(again), Some(&page(5)[..]));
    }
}
