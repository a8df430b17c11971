use super::*;
use vstorage::MemIo;

/// A closed gate refuses every change to the file and lets reads pass.
#[test]
fn a_closed_gate_stops_writes_only() {
    let gate = WriteGate::default();
    let mut io = GatedIo::new(Box::new(MemIo::new()), gate.clone());
    io.write_at(0, &[1, 2, 3]).unwrap();
    gate.close();
    let e = io.write_at(0, &[9]).unwrap_err();
    assert!(e.to_string().contains("fenced"), "{e}");
    assert!(io.flush().is_err() && io.set_len(0).is_err() && io.allocate(0, 512).is_err());
    let mut b = [0u8; 3];
    io.read_at(0, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3]);
    gate.open();
    io.write_at(0, &[9]).unwrap();
}

#[test]
fn shared_stores_and_lease_locations() {
    assert!(is_shared_store("shared") && !is_shared_store("local"));
    assert_eq!(store_of("shared:vms/s/s-0.vhdx"), "shared");
    assert_eq!(lease_location("shared", "s"), "shared:vms/s/s.lease");
}
