//! The heap ranges (`VIRTIO_DMAHEAP_F_HEAP_RANGE`, spec 6.3): the part of the window that
//! holds every buffer of a heap, decided once, at start-up, from the heaps' cache attributes.
//!
//! A driver maps each range with one memory type (write-back with struct pages for cached
//! heaps, WC or UC- / Normal-NC without for the others), so ranges of different attributes
//! must never share a 2 MiB unit. With one attribute in use its range is the whole window
//! (what every heap got before the feature). With `n` attributes the window is split
//! evenly: each gets `floor(window / n / 2 MiB) * 2 MiB` bytes, laid out from offset 0 in
//! the order cached, uncached, wc. Heaps with the same attribute share its range.

use super::CacheMode;
use crate::abi::VIRTIO_DMAHEAP_RANGE_ALIGN;

/// Alignment (and smallest length) of a heap range that is not the whole window.
pub const RANGE_ALIGN: u64 = VIRTIO_DMAHEAP_RANGE_ALIGN;

/// The order of the ranges in the window.
const ORDER: [CacheMode; 3] = [
    CacheMode::Cached,
    CacheMode::Uncached,
    CacheMode::WriteCombined,
];

/// A part of the window: `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapRange {
    /// Start in the window.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl HeapRange {
    /// The first byte after the range.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    /// Whether `[offset, offset + len)` lies wholly inside the range.
    pub fn holds(&self, offset: u64, len: u64) -> bool {
        offset >= self.offset && offset.checked_add(len).is_some_and(|e| e <= self.end())
    }
}

/// Why the window cannot be split between the cache attributes in use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a window of {shm_size} bytes split evenly between the {attrs} cache attributes in use \
     ({names}) leaves less than {RANGE_ALIGN} bytes (2 MiB) per attribute: give --shm-size \
     at least {need}"
)]
pub struct LayoutError {
    /// The window size.
    pub shm_size: u64,
    /// How many cache attributes are in use.
    pub attrs: usize,
    /// Their names.
    pub names: String,
    /// The smallest window size that works.
    pub need: u64,
}

/// The cache attributes in use, in range order (cached, uncached, wc), each once.
pub fn attributes(caches: &[CacheMode]) -> Vec<CacheMode> {
    ORDER.into_iter().filter(|c| caches.contains(c)).collect()
}

/// The range of each attribute in use, in the order of [`attributes`].
fn attribute_ranges(
    shm_size: u64,
    attrs: &[CacheMode],
) -> Result<Vec<(CacheMode, HeapRange)>, LayoutError> {
    if attrs.len() <= 1 {
        return Ok(attrs
            .iter()
            .map(|&c| {
                (
                    c,
                    HeapRange {
                        offset: 0,
                        len: shm_size,
                    },
                )
            })
            .collect());
    }
    let n = attrs.len() as u64;
    let len = shm_size / n / RANGE_ALIGN * RANGE_ALIGN;
    if len == 0 {
        return Err(LayoutError {
            shm_size,
            attrs: attrs.len(),
            names: attrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            need: (n * RANGE_ALIGN).next_power_of_two(),
        });
    }
    Ok(attrs
        .iter()
        .zip(0u64..)
        .map(|(&c, i)| {
            (
                c,
                HeapRange {
                    offset: i * len,
                    len,
                },
            )
        })
        .collect())
}

/// The range of each heap, given each heap's cache attribute, in heap order.
pub fn heap_ranges(shm_size: u64, caches: &[CacheMode]) -> Result<Vec<HeapRange>, LayoutError> {
    let by_attr = attribute_ranges(shm_size, &attributes(caches))?;
    Ok(caches
        .iter()
        .map(|c| {
            by_attr.iter().find(|(a, _)| a == c).map_or(
                HeapRange {
                    offset: 0,
                    len: shm_size,
                },
                |&(_, r)| r,
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use CacheMode::*;

    const M: u64 = 1 << 20;

    #[test]
    fn one_attribute_gets_the_whole_window() {
        for c in ORDER {
            let r = heap_ranges(2 * M, &[c, c]).unwrap();
            assert_eq!(
                r,
                vec![
                    HeapRange {
                        offset: 0,
                        len: 2 * M
                    };
                    2
                ]
            );
        }
        assert_eq!(heap_ranges(4 << 30, &[]).unwrap(), vec![]);
    }

    #[test]
    fn several_attributes_split_the_window_evenly_in_a_fixed_order() {
        let r = heap_ranges(1 << 30, &[WriteCombined, Cached, Uncached, Cached]).unwrap();
        let third = (1 << 30) / 3 / RANGE_ALIGN * RANGE_ALIGN;
        assert_eq!(third, 340 * M);
        let cached = HeapRange {
            offset: 0,
            len: third,
        };
        let uncached = HeapRange {
            offset: third,
            len: third,
        };
        let wc = HeapRange {
            offset: 2 * third,
            len: third,
        };
        assert_eq!(r, vec![wc, cached, uncached, cached]);
        let r = heap_ranges(4 * M, &[WriteCombined, Uncached]).unwrap();
        assert_eq!(
            r,
            vec![
                HeapRange {
                    offset: 2 * M,
                    len: 2 * M
                },
                HeapRange {
                    offset: 0,
                    len: 2 * M
                }
            ]
        );
    }

    #[test]
    fn a_window_too_small_to_split_is_refused_with_the_sizes() {
        let e = heap_ranges(4 * M, &[Cached, Uncached, WriteCombined]).unwrap_err();
        assert_eq!(e.need, 8 * M);
        let msg = e.to_string();
        assert!(msg.contains("4194304") && msg.contains("8388608"), "{msg}");
        assert!(msg.contains("cached, uncached, wc"), "{msg}");
        assert!(heap_ranges(2 * M, &[Cached, WriteCombined]).is_err());
        assert!(heap_ranges(4 * M, &[Cached, WriteCombined]).is_ok());
    }

    #[test]
    fn holds() {
        let r = HeapRange {
            offset: 2 * M,
            len: 2 * M,
        };
        assert!(r.holds(2 * M, 2 * M));
        assert!(!r.holds(2 * M - 4096, 4096));
        assert!(!r.holds(4 * M - 4096, 8192));
        assert!(!r.holds(u64::MAX, 2));
    }
}
