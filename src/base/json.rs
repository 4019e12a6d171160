//! JSON strings: which bytes go into one as they are. The access log escapes what does
//! not (`logs::record`), and names checked once when they are loaded (a key's consumer and
//! id, a route's name) skip the check on every record.

/// Whether `value` goes into a JSON string as it is (every byte one [`SAFE`] holds),
/// eight bytes at a time: a byte-wise table
/// lookup took about a hundred instructions for a request id alone, a record having
/// several such values (docs/benchmarks.md, "Fewer and smaller moves").
pub fn plain_string(value: &[u8]) -> bool {
    let mut words = value.chunks_exact(8);
    for word in &mut words {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        if !word_safe(u64::from_le_bytes(bytes)) {
            return false;
        }
    }
    words.remainder().iter().all(|&b| SAFE[usize::from(b)])
}

/// [`SAFE`] for eight bytes at once. Each test below is exact for "any byte", which is all
/// that is asked (the classic bit tricks for bytes below, above or equal to a value).
fn word_safe(x: u64) -> bool {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_le_bytes([0x80; 8]);
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0;
    // Adding 1 sets the high bit of 0x7f; bytes already at 0x80 and above have it.
    let above_tilde = (x.wrapping_add(ONES) | x) & HIGH != 0;
    !(below_space || above_tilde || zero_byte(x ^ (ONES * u64::from(b'"'))) || zero_byte(x ^ (ONES * u64::from(b'\\'))))
}

/// Bytes a JSON string holds as they are: printable ASCII but `"` and `\`.
static SAFE: [bool; 256] = {
    let mut safe = [false; 256];
    let mut b = 0x20;
    while b < 0x7f {
        safe[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    safe
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_bytes_at_a_time_agree_with_the_table() {
        // Every byte value at every place of a word, and in the tail behind one.
        for len in [1, 7, 8, 9, 16, 17] {
            for place in 0..len {
                for b in 0..=255u8 {
                    let mut value = vec![b'a'; len];
                    value[place] = b;
                    assert_eq!(
                        plain_string(&value),
                        SAFE[usize::from(b)],
                        "byte {b:#04x} at {place} of {len}"
                    );
                }
            }
        }
        // Neighbours of the limits together, where a borrow between bytes could hide one.
        for pair in [
            [0x1f, 0x20],
            [0x20, 0x1f],
            [0x7e, 0x7f],
            [0x7f, 0x7e],
            [0x00, 0xff],
            [0x21, 0x23],
            [0x5b, 0x5d],
        ] {
            let mut value = *b"abcdefgh";
            value[3..5].copy_from_slice(&pair);
            let expected = pair.iter().all(|&b| SAFE[usize::from(b)]);
            assert_eq!(plain_string(&value), expected, "{pair:?}");
        }
        assert!(plain_string(b""));
        assert!(plain_string(b"0123456789abcdef0123456789abcdef"));
    }
}
