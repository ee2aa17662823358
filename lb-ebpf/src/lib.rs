#![no_std]
// The kernel programs live in the `lb` binary (src/main.rs); this library exists so that
// lb-userspace can name the crate as a build dependency and be rebuilt when it changes.
