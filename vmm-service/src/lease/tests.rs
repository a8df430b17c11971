use super::*;
use alloc::rc::Rc;
use core::cell::{Cell, RefCell};

/// A lease file in memory, shared by the simulated nodes; `broken` makes
/// every operation fail as an unreachable store would.
#[derive(Clone, Default)]
struct MemLease {
    bytes: Rc<RefCell<Option<Vec<u8>>>>,
    broken: Rc<Cell<bool>>,
    /// This node's side name (`NAME.next-NODE`), when staging is on.
    staged: Option<Rc<RefCell<Option<Vec<u8>>>>>,
    /// Lease writes (replace, create, commit) made through this handle.
    writes: Rc<Cell<u32>>,
}

impl MemLease {
    fn check(&self) -> Result<(), String> {
        if self.broken.get() {
            return Err("store unreachable".into());
        }
        Ok(())
    }
    /// The same lease as another node sees it, with its own side name.
    fn staging(&self) -> MemLease {
        MemLease {
            staged: Some(Rc::default()),
            writes: Rc::default(),
            ..self.clone()
        }
    }
    fn record(&self) -> Option<LeaseRecord> {
        self.bytes
            .borrow()
            .as_ref()
            .map(|b| LeaseRecord::decode(b).unwrap())
    }
}

impl LeaseFile for MemLease {
    fn read(&self) -> Result<Option<Vec<u8>>, String> {
        self.check()?;
        Ok(self.bytes.borrow().clone())
    }
    fn create_new(&self, bytes: &[u8]) -> Result<bool, String> {
        self.check()?;
        let mut b = self.bytes.borrow_mut();
        if b.is_some() {
            return Ok(false);
        }
        *b = Some(bytes.to_vec());
        Ok(true)
    }
    fn replace(&self, bytes: &[u8]) -> Result<(), String> {
        self.check()?;
        self.writes.set(self.writes.get() + 1);
        *self.bytes.borrow_mut() = Some(bytes.to_vec());
        Ok(())
    }
    fn stage(&self, bytes: &[u8]) -> Result<(), String> {
        self.check()?;
        let s = self.staged.as_ref().ok_or("no side names")?;
        *s.borrow_mut() = Some(bytes.to_vec());
        Ok(())
    }
    fn commit_staged(&self) -> Result<(), String> {
        self.check()?;
        let s = self.staged.as_ref().ok_or("no side names")?;
        let b = s.borrow_mut().take().ok_or("nothing staged")?;
        self.writes.set(self.writes.get() + 1);
        *self.bytes.borrow_mut() = Some(b);
        Ok(())
    }
    fn remove(&self) -> Result<(), String> {
        self.check()?;
        *self.bytes.borrow_mut() = None;
        Ok(())
    }
}

const T: Timing = Timing::DEFAULT;

fn node(name: &str, incarnation: u64) -> Lease {
    Lease::new("s", name, incarnation, T)
}

#[test]
fn records_round_trip_and_bad_ones_are_named() {
    let r = LeaseRecord {
        vm: "s".into(),
        owner: "a".into(),
        incarnation: 7,
        epoch: 3,
        counter: 99,
    };
    assert_eq!(LeaseRecord::decode(&r.encode()).unwrap(), r);
    let good = String::from_utf8(r.encode()).unwrap();
    let cases: &[(String, &str)] = &[
        (
            good.replace("hvmigrate-lease 1", "lease 2"),
            "does not start",
        ),
        (good.replace("epoch=3", "epoch=x"), "epoch is not a number"),
        (good.replace("epoch=3\n", ""), "lacks epoch"),
        (format!("{good}epoch=4\n"), "names epoch twice"),
        (format!("{good}colour=red\n"), "unknown key"),
        (format!("{good}junk\n"), "not KEY=VALUE"),
        (good.replace("owner=a", "owner=a b"), "owner is not a name"),
        (good.replace("owner=a", "owner="), "owner is not a name"),
        (format!("{good}{}", "x".repeat(600)), "at most 512"),
    ];
    for (text, want) in cases {
        let e = LeaseRecord::decode(text.as_bytes()).unwrap_err();
        assert!(e.contains(want), "{text:?}: {e}");
    }
    assert!(LeaseRecord::decode(&[0xff, 0xfe])
        .unwrap_err()
        .contains("UTF-8"));
    // Arbitrary bytes: an error or a record, never a panic.
    let mut x = 0x1234_5678_u32;
    for len in 0..2000usize {
        let mut b = good.clone().into_bytes();
        for _ in 0..(len % 7 + 1) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let i = x as usize % (b.len() + 1);
            if i < b.len() {
                b[i] = (x >> 8) as u8;
            } else {
                b.push((x >> 16) as u8);
            }
        }
        let _ = LeaseRecord::decode(&b);
    }
}

#[test]
fn timing_is_checked() {
    T.check().unwrap();
    let bad = |t: Timing, want: &str| assert!(t.check().unwrap_err().contains(want));
    bad(
        Timing {
            settle_ms: 1_500,
            ..T
        },
        "settle",
    );
    bad(
        Timing {
            expire_ms: 2_500,
            ..T
        },
        "expiry",
    );
    bad(Timing { margin_ms: 0, ..T }, "above 0");
}

/// A free lease is taken at once; while its owner renews, another node
/// never gets it and never may write, however long it polls.
#[test]
fn a_renewed_lease_is_never_taken() {
    let f = MemLease::default();
    let (mut a, mut b) = (node("a", 1), node("b", 2));
    assert_eq!(a.acquire(0, &f).unwrap(), Acquire::Owned);
    assert_eq!(
        b.acquire(0, &f).unwrap(),
        Acquire::Held {
            owner: Some("a".into()),
            claim_in_ms: T.expire_ms
        }
    );
    for t in (100..120_000).step_by(100) {
        assert_eq!(a.renew(t, &f), Renewal::Held);
        assert!(a.may_write(t));
        assert!(matches!(b.poll(t, &f).unwrap(), Acquire::Held { .. }));
        assert!(!b.may_write(t));
    }
    assert!(f.record().unwrap().counter >= 100);
    // Released: the next node takes it at once.
    a.release(&f).unwrap();
    assert!(!a.may_write(120_000));
    assert_eq!(b.poll(120_100, &f).unwrap(), Acquire::Owned);
    assert_eq!(f.record().unwrap().owner, "b");
}

/// An owner that stops renewing (crashed) stops writing first; another
/// node claims after the expiry time, owns after the settle time, and
/// the old owner, back, finds it lost.
#[test]
fn a_crashed_owner_is_taken_over_after_expiry() {
    let f = MemLease::default();
    let (mut a, mut b) = (node("a", 1), node("b", 2));
    a.acquire(0, &f).unwrap();
    b.acquire(0, &f).unwrap();
    let mut owned_at = None;
    for t in (0..30_000).step_by(50) {
        assert!(!(a.may_write(t) && b.may_write(t)), "two writers at {t} ms");
        if b.poll(t, &f).unwrap() == Acquire::Owned && owned_at.is_none() {
            owned_at = Some(t);
        }
    }
    assert!(!a.may_write(T.expire_ms - T.margin_ms));
    assert_eq!(owned_at, Some(T.expire_ms + T.settle_ms));
    let r = f.record().unwrap();
    assert_eq!((r.owner.as_str(), r.epoch), ("b", 2));
    match a.renew(30_000, &f) {
        Renewal::Lost(why) => assert!(why.contains("held by b (epoch 2)"), "{why}"),
        other => panic!("{other:?}"),
    }
    // A node restarted under its old name is a new incarnation: it waits
    // like anyone else.
    let mut a2 = node("b", 3);
    assert!(matches!(
        a2.acquire(30_000, &f).unwrap(),
        Acquire::Held { .. }
    ));
}

/// An unreachable store: renewals fail, the owner stops writing once its
/// allowance runs out, and gets going again when the store returns.
#[test]
fn a_store_that_stops_answering_fences_the_owner() {
    let f = MemLease::default();
    let mut a = node("a", 1);
    a.acquire(0, &f).unwrap();
    f.broken.set(true);
    assert!(a.acquire(0, &f).is_ok(), "an owner asking again is told so");
    assert!(matches!(a.renew(1_000, &f), Renewal::Failed(e) if e.contains("unreachable")));
    assert!(a.may_write(T.expire_ms - T.margin_ms - 1));
    assert!(!a.may_write(T.expire_ms - T.margin_ms));
    assert!(node("b", 2).acquire(0, &f).is_err());
    f.broken.set(false);
    assert_eq!(a.renew(12_000, &f), Renewal::Held);
    assert!(a.may_write(12_000));
}

/// Live migration on a shared store: the source hands the lease to the
/// destination, stops writing at once; the destination adopts it with the
/// epoch it was told and renews it; a third node keeps off.
#[test]
fn a_lease_is_handed_over() {
    let f = MemLease::default();
    let (mut a, mut b, mut c) = (node("a", 1), node("b", 2), node("c", 3));
    a.acquire(0, &f).unwrap();
    c.acquire(0, &f).unwrap();
    let given = a.hand_over("b", 1, &f).unwrap();
    assert_eq!((given.owner.as_str(), given.epoch), ("b", 2));
    assert!(!a.may_write(1));
    let e = b.adopt(1, 5, &f).unwrap_err();
    assert!(
        e.contains("names b with epoch 2, not this node with epoch 1"),
        "{e}"
    );
    b.adopt(2, 5, &f).unwrap();
    assert_eq!(f.record().unwrap().incarnation, 2);
    for t in (100..60_000).step_by(100) {
        b.renew(t, &f);
        assert!(b.may_write(t));
        assert!(matches!(c.poll(t, &f).unwrap(), Acquire::Held { .. }));
    }
    assert!(matches!(a.renew(60_000, &f), Renewal::Lost(_)));
    assert!(a.hand_over("c", 60_000, &f).is_err());
}

/// A hand-over and an adoption staged ahead of the pause (the source's
/// when the destination accepts, the destination's from the record it
/// reads then): inside the pause each is one rename and nothing is read;
/// the records are those of the unstaged path, and the lease is untouched
/// until then.
#[test]
fn a_staged_hand_over_and_adoption_are_one_write_each() {
    let f = MemLease::default();
    let (fa, fb) = (f.staging(), f.staging());
    let (mut a, mut b) = (node("a", 1), node("b", 2));
    a.acquire(0, &fa).unwrap();
    let before = f.record().unwrap();
    b.prepare_adopt("a", 5, &fb);
    a.prepare_hand_over("b", 10, &fa);
    assert_eq!(
        f.record().unwrap(),
        before,
        "staging leaves the lease alone"
    );
    assert!(a.may_write(20), "staging is no hand-over");
    a.renew(1_500, &fa);
    let given = a.hand_over("b", 1_600, &fa).unwrap();
    assert_eq!(
        (given.owner.as_str(), given.epoch, given.incarnation),
        ("b", 2, 0)
    );
    assert_eq!(f.record().unwrap(), given);
    assert!(
        fa.staged.as_ref().unwrap().borrow().is_none(),
        "renamed, not copied"
    );
    assert_eq!(fa.writes.get(), 2, "the renewal, then the hand-over");
    assert!(!a.may_write(1_600));
    // The source's store fails while b reads: b does not read.
    f.broken.set(true);
    assert!(fb.read().is_err());
    f.broken.set(false);
    b.adopt(2, 1_700, &fb).unwrap();
    assert_eq!(fb.writes.get(), 1);
    let r = f.record().unwrap();
    assert_eq!(
        (r.owner.as_str(), r.epoch, r.incarnation, r.counter),
        ("b", 2, 2, 0)
    );
    assert!(b.may_write(1_700));
    assert_eq!(b.renew(2_800, &fb), Renewal::Held);
    assert_eq!(f.record().unwrap().counter, 1);
}

/// b staged its adoption at 0, a handed the lease over at 1, and c, at
/// 1, found it held: the lease file, each node's view of it (a, b, c),
/// and the three nodes.
fn staged_hand_over_watched() -> (MemLease, [MemLease; 3], [Lease; 3]) {
    let f = MemLease::default();
    let (fa, fb, fc) = (f.staging(), f.staging(), f.staging());
    let (mut a, mut b, mut c) = (node("a", 1), node("b", 2), node("c", 3));
    a.acquire(0, &fa).unwrap();
    b.prepare_adopt("a", 0, &fb);
    a.hand_over("b", 1, &fa).unwrap();
    assert!(matches!(c.acquire(1, &fc).unwrap(), Acquire::Held { .. }));
    (f, [fa, fb, fc], [a, b, c])
}

/// A staged adoption is a rename without a read, so it is used only for
/// the epoch it was staged for and while no claim on the hand-over (which
/// came after the staging read) can have settled: `expire + settle - 2
/// margin` after that read. Later the adoption reads the lease as before
/// and refuses a record that is not the hand-over; a claim written before
/// the rename yields to it.
#[test]
fn a_staged_adoption_reads_again_once_a_claim_could_have_settled() {
    let window = T.expire_ms + T.settle_ms - 2 * T.margin_ms;
    // b stages at 0; a hands over at 1; `go` comes very late: c watched
    // the hand-over record for the expiry, claimed and settled.
    let (f, [_, fb, fc], [_, mut b, mut c]) = staged_hand_over_watched();
    assert!(matches!(
        c.poll(1 + T.expire_ms, &fc).unwrap(),
        Acquire::Settling { .. }
    ));
    let settled = 1 + T.expire_ms + T.settle_ms;
    assert_eq!(c.poll(settled, &fc).unwrap(), Acquire::Owned);
    assert!(settled > window);
    let e = b.adopt(2, settled, &fb).unwrap_err();
    assert!(e.contains("names c with epoch 3"), "{e}");
    assert_eq!(f.record().unwrap().owner, "c", "c's claim stands");
    assert!(!b.may_write(settled) && c.may_write(settled));

    // Within the window: a claim on the hand-over, written before b's
    // rename, has not settled when the rename lands; c reads b's record
    // back and yields.
    let (f, [_, fb, fc], [_, mut b, mut c]) = staged_hand_over_watched();
    let claim = 1 + T.expire_ms;
    assert!(matches!(
        c.poll(claim, &fc).unwrap(),
        Acquire::Settling { .. }
    ));
    let go = window - 1;
    assert!(go > claim && go < claim + T.settle_ms);
    b.adopt(2, go, &fb).unwrap();
    assert!(b.may_write(go));
    assert!(matches!(
        c.poll(claim + T.settle_ms, &fc).unwrap(),
        Acquire::Held { .. }
    ));
    assert!(!c.may_write(claim + T.settle_ms));
    assert_eq!(f.record().unwrap().owner, "b");

    // Staged for another epoch (a's lease changed hands meanwhile), or
    // nothing staged (the lease was not the source's): read and refused.
    let f = MemLease::default();
    let (fa, fb) = (f.staging(), f.staging());
    let (mut a, mut b) = (node("a", 1), node("b", 2));
    b.prepare_adopt("a", 0, &fb);
    assert!(b.staged.is_none(), "no lease yet: nothing staged");
    a.acquire(0, &fa).unwrap();
    b.prepare_adopt("a", 1, &fb);
    a.hand_over("b", 2, &fa).unwrap();
    assert!(b.adopt(3, 3, &fb).is_err());
    assert_eq!(f.record().unwrap().incarnation, 0, "not adopted");
    b.prepare_adopt("x", 4, &fb);
    assert!(b.staged.is_none(), "not x's lease");
}

/// An owner whose renewals stopped landing (it may no longer write: the
/// lease may be someone else's by now) does not hand it over.
#[test]
fn an_owner_that_may_not_write_does_not_hand_over() {
    let f = MemLease::default();
    let fa = f.staging();
    let mut a = node("a", 1);
    a.acquire(0, &fa).unwrap();
    a.prepare_hand_over("b", 0, &fa);
    let late = T.expire_ms - T.margin_ms;
    let e = a.hand_over("b", late, &fa).unwrap_err();
    assert!(e.contains("not renewed in time"), "{e}");
    assert_eq!(f.record().unwrap().owner, "a", "nothing written");
    assert!(!a.may_write(late));
}

/// Random schedules of three nodes sharing one lease: owners stall (a
/// paused VM host, a slow store) and restart at random, operations come
/// in random order within each step. Never two nodes allowed to write at
/// the same instant, and the lease does not stay unowned for ever.
#[test]
fn never_two_writers_under_random_stalls_and_restarts() {
    for seed in 1..=100u64 {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let f = MemLease::default();
        let names = ["a", "b", "c"];
        let mut inc = 10;
        let mut nodes: Vec<Lease> = names.iter().map(|n| node(n, 0)).collect();
        let mut stalled_until = [0u64; 3];
        let mut owned_steps = 0;
        for t in (0..200_000u64).step_by(50) {
            let first = rand(3) as usize;
            for k in 0..3 {
                let i = (first + k) % 3;
                if t < stalled_until[i] {
                    continue;
                }
                match rand(4_000) {
                    0 => {
                        stalled_until[i] = t + rand(25_000);
                        continue;
                    }
                    1 => {
                        inc += 1;
                        nodes[i] = node(names[i], inc);
                    }
                    _ => {}
                }
                let n = &mut nodes[i];
                if matches!(n.state(), State::Owned { .. }) {
                    n.renew(t, &f);
                } else {
                    n.poll(t, &f).unwrap();
                }
            }
            let writers = nodes.iter().filter(|n| n.may_write(t)).count();
            assert!(writers <= 1, "seed {seed}: {writers} writers at {t} ms");
            if writers == 1 {
                owned_steps += 1;
            }
        }
        assert!(
            owned_steps > 2_000,
            "seed {seed}: owned only {owned_steps} of 4000 steps"
        );
    }
}
