//! Raw VM-exit fields (exit code / reason, EXITINFO / qualification,
//! GPA, instruction length, event information, guest registers) into the
//! SVM or VMX decoder, chosen by the first byte: it must never panic and
//! must only produce exits the handler can meet. Layout in
//! `hvcore::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    hvcore::fuzzing::fuzz_exit_decode(data);
});
