//! Test-only: the ChaCha20 and Poly1305 inside libssh2, which encrypt every byte walship sends
//! over SFTP (`chacha20-poly1305@openssh.com`), checked against RustCrypto's implementations.
//!
//! walship's vendored libssh2 (`vendor/README.md`) hands inputs of at least 256 bytes
//! (ChaCha20) and 512 bytes (Poly1305) to OpenSSL, and keeps its portable code for shorter
//! ones and for a ChaCha20 block counter that would pass 2^32 within the call (OpenSSL
//! documents a 32-bit counter, the portable code carries into 64). These tests call the C
//! functions on both sides of each threshold: both paths must give the keystream and the tags
//! of the reference, so that a patch that broke either one fails here and not only as a MAC
//! error against a real server.

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use poly1305::universal_hash::KeyInit;

/// libssh2's `struct chacha_ctx` (`chacha.h`).
#[repr(C)]
struct ChachaCtx {
    input: [u32; 16],
}

extern "C" {
    fn chacha_keysetup(x: *mut ChachaCtx, k: *const u8, kbits: u32);
    fn chacha_ivsetup(x: *mut ChachaCtx, iv: *const u8, counter: *const u8);
    fn chacha_encrypt_bytes(x: *mut ChachaCtx, m: *const u8, c: *mut u8, bytes: usize);
    fn poly1305_auth(out: *mut u8, m: *const u8, inlen: usize, key: *const u8);
}

/// Deterministic bytes, different for each `seed`.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `N` deterministic bytes, different for each `seed`.
fn array<const N: usize>(seed: u64) -> [u8; N] {
    let v = bytes(N, seed);
    std::array::from_fn(|i| v[i])
}

/// libssh2's ChaCha20 over `data`, keyed with `key`, nonce `iv`, from block `counter`.
fn libssh2_chacha(key: &[u8; 32], iv: &[u8; 8], counter: u64, data: &[u8]) -> Vec<u8> {
    let mut ctx = ChachaCtx { input: [0; 16] };
    let ctr = counter.to_le_bytes();
    let mut out = vec![0u8; data.len()];
    // SAFETY: the pointers are valid for the lengths libssh2 reads and writes: a 32-byte key,
    // 8-byte nonce and counter, and `data.len()` bytes in and out.
    unsafe {
        chacha_keysetup(&mut ctx, key.as_ptr(), 256);
        chacha_ivsetup(&mut ctx, iv.as_ptr(), ctr.as_ptr());
        chacha_encrypt_bytes(&mut ctx, data.as_ptr(), out.as_mut_ptr(), data.len());
    }
    out
}

/// RustCrypto's ChaCha20 (the original 64-bit nonce variant) over `data`, from block `counter`.
fn reference_chacha(key: &[u8; 32], iv: &[u8; 8], counter: u64, data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut c = chacha20::ChaCha20Legacy::new(key.into(), iv.into());
    c.seek(counter * 64);
    c.apply_keystream(&mut out);
    out
}

/// libssh2's Poly1305 tag of `data` under `key`.
fn libssh2_poly1305(key: &[u8; 32], data: &[u8]) -> [u8; 16] {
    let mut tag = [0u8; 16];
    // SAFETY: a 16-byte tag out, `data.len()` bytes in, a 32-byte key.
    unsafe { poly1305_auth(tag.as_mut_ptr(), data.as_ptr(), data.len(), key.as_ptr()) };
    tag
}

/// RustCrypto's Poly1305 tag of `data` under `key`.
fn reference_poly1305(key: &[u8; 32], data: &[u8]) -> [u8; 16] {
    poly1305::Poly1305::new(key.into())
        .compute_unpadded(data)
        .into()
}

#[test]
fn chacha20_matches_the_reference_below_and_above_the_openssl_threshold() {
    for (i, n) in [1, 63, 64, 255, 256, 257, 600, 4096, 32_781, 70_000]
        .into_iter()
        .enumerate()
    {
        for counter in [0u64, 1, 1000] {
            let seed = (i as u64) << 8 | counter;
            let key: [u8; 32] = array(seed);
            let iv: [u8; 8] = array(seed + 1);
            let data = bytes(n, seed + 2);
            assert_eq!(
                libssh2_chacha(&key, &iv, counter, &data),
                reference_chacha(&key, &iv, counter, &data),
                "{n} bytes from block {counter}"
            );
        }
    }
}

#[test]
fn chacha20_carries_its_block_counter_past_32_bits() {
    // 4 KiB from 8 blocks before 2^32: the counter's low word wraps within the call (a call
    // the patch keeps from OpenSSL, whose documented counter is 32 bits). One call must equal
    // 64-byte calls, which the portable code serves, each from its own block.
    let key: [u8; 32] = array(7);
    let iv: [u8; 8] = array(8);
    let data = bytes(4096, 9);
    let start = (1u64 << 32) - 8;
    let whole = libssh2_chacha(&key, &iv, start, &data);
    let blocks: Vec<u8> = data
        .chunks(64)
        .enumerate()
        .flat_map(|(b, chunk)| libssh2_chacha(&key, &iv, start + b as u64, chunk))
        .collect();
    assert_eq!(whole, blocks);
    // And the words past the wrap really differ from a counter that did not carry.
    let no_carry = libssh2_chacha(&key, &iv, 0, &data[512..]);
    assert_ne!(&whole[512..], &no_carry[..]);
}

#[test]
fn poly1305_matches_the_reference_below_and_above_the_openssl_threshold() {
    for (i, n) in [0, 1, 16, 511, 512, 513, 4096, 65_541]
        .into_iter()
        .enumerate()
    {
        let key: [u8; 32] = array(100 + i as u64);
        let data = bytes(n, 200 + i as u64);
        assert_eq!(
            libssh2_poly1305(&key, &data),
            reference_poly1305(&key, &data),
            "{n} bytes"
        );
    }
}

#[test]
fn threads_encrypting_at_once_each_get_their_own_keystream_and_tags() {
    // Each thread keeps its own OpenSSL contexts, re-keyed on every call: threads interleaving
    // calls with different keys must each get the reference's output, call after call.
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                for round in 0..200u64 {
                    let seed = t << 16 | round;
                    let key: [u8; 32] = array(seed);
                    let iv: [u8; 8] = array(seed + 1);
                    let data = bytes(600 + (round as usize % 7) * 100, seed + 2);
                    assert_eq!(
                        libssh2_chacha(&key, &iv, 0, &data),
                        reference_chacha(&key, &iv, 0, &data),
                        "thread {t} round {round}"
                    );
                    assert_eq!(
                        libssh2_poly1305(&key, &data),
                        reference_poly1305(&key, &data),
                        "thread {t} round {round}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().is_ok());
    }
}
