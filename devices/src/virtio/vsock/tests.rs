//! Device tests: the real event loop thread, mock guest memory driven like a guest driver
//! would, and real Unix sockets in a temp dir.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::packet::{op, HDR_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND};
use super::testing::{closed, ghdr, read_line, read_n, Config, Harness, WAIT};
use super::*;
use crate::virtio::VirtioDevice;

fn harness() -> Harness {
    Harness::new(Config::default())
}

fn harness_with(timeout: Duration) -> Harness {
    Harness::new(Config {
        handshake_timeout: timeout,
        ..Config::default()
    })
}

#[test]
fn config_space_holds_the_guest_cid() {
    let dir = tempfile::tempdir().unwrap();
    let v = Vsock::new(42, dir.path().join("s")).unwrap();
    assert_eq!(v.config_space(), 42u64.to_le_bytes());
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes().len(), 3);
    assert!(Vsock::new(2, dir.path().join("t")).is_err());
}

#[test]
fn stale_socket_file_is_replaced_but_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    drop(UnixListener::bind(&path).unwrap());
    assert!(Vsock::new(3, &path).is_ok());
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    assert!(Vsock::new(3, &file).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn host_connect_gets_ok_after_guest_response() {
    let mut h = harness();
    let (_c, local) = h.host_connect(52, 64 * 1024);
    assert!(local >= 1 << 30);
    assert_eq!(h.dev.lock().unwrap().connection_count(), 1);
}

#[test]
fn host_connect_refused_by_guest_closes_the_client() {
    let mut h = harness();
    let mut c = h.client();
    c.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = h.recv();
    h.send(ghdr(op::RST, 52, req.src_port), &[]);
    assert!(closed(&mut c));
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn data_flows_both_ways_after_host_connect() {
    let mut h = harness();
    let (mut c, local) = h.host_connect(52, 64 * 1024);
    c.write_all(b"{\"op\":\"ping\"}\n").unwrap();
    let (p, data) = h.recv();
    assert_eq!((p.op, p.src_port, p.dst_port), (op::RW, local, 52));
    assert_eq!(data, b"{\"op\":\"ping\"}\n");
    assert_eq!(p.buf_alloc, CONN_BUF_SIZE);
    h.send(ghdr(op::RW, 52, local), b"{\"ok\":true}\n");
    assert_eq!(read_n(&mut c, 12), b"{\"ok\":true}\n");
}

#[test]
fn bytes_sent_with_the_connect_line_reach_the_guest() {
    let mut h = harness();
    let mut c = h.client();
    c.write_all(b"CONNECT 7\nearly").unwrap();
    let (req, _) = h.recv();
    h.send(ghdr(op::RESPONSE, 7, req.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}", req.src_port));
    let (p, data) = h.recv();
    assert_eq!((p.op, data.as_slice()), (op::RW, &b"early"[..]));
}

#[test]
fn host_data_stalls_without_credit_and_resumes_on_credit_update() {
    let mut h = harness();
    let (mut c, local) = h.host_connect(52, 8);
    c.write_all(b"0123456789abcdefghij").unwrap();
    let (p, data) = h.recv();
    assert_eq!((p.op, data.as_slice()), (op::RW, &b"01234567"[..]));
    h.expect_silence(100);
    let mut upd = ghdr(op::CREDIT_UPDATE, 52, local);
    upd.buf_alloc = 8;
    upd.fwd_cnt = 8;
    h.send(upd, &[]);
    let (_, data) = h.recv();
    assert_eq!(data, b"89abcdef");
    h.expect_silence(50);
    upd.fwd_cnt = 16;
    h.send(upd, &[]);
    let (_, data) = h.recv();
    assert_eq!(data, b"ghij");
}

#[test]
fn a_stalled_connection_does_not_block_another() {
    let mut h = harness();
    let (mut stalled, _) = h.host_connect(52, 4);
    let (mut other, other_port) = h.host_connect(53, 64 * 1024);
    stalled.write_all(b"aaaaaaaa").unwrap();
    let (p, _) = h.recv();
    assert_eq!(p.dst_port, 52);
    other.write_all(b"hello").unwrap();
    let (p, data) = h.recv();
    assert_eq!((p.src_port, data.as_slice()), (other_port, &b"hello"[..]));
}

#[test]
fn credit_request_gets_update_with_the_forwarded_count() {
    let mut h = harness();
    let (mut c, local) = h.host_connect(52, 64 * 1024);
    h.send(ghdr(op::RW, 52, local), &[9u8; 1000]);
    assert_eq!(read_n(&mut c, 1000), vec![9u8; 1000]);
    h.send(ghdr(op::CREDIT_REQUEST, 52, local), &[]);
    let (p, _) = h.recv();
    assert_eq!(
        (p.op, p.fwd_cnt, p.buf_alloc),
        (op::CREDIT_UPDATE, 1000, CONN_BUF_SIZE)
    );
}

#[test]
fn credit_update_follows_half_a_buffer_of_guest_data() {
    let mut h = harness();
    let (mut c, local) = h.host_connect(52, 64 * 1024);
    let reader = std::thread::spawn(move || read_n(&mut c, 3 * 60 * 1024));
    for _ in 0..3 {
        h.send(ghdr(op::RW, 52, local), &[1u8; 60 * 1024]);
    }
    let (p, _) = h.recv();
    assert_eq!(p.op, op::CREDIT_UPDATE);
    assert!(p.fwd_cnt >= CONN_BUF_SIZE / 2);
    assert_eq!(reader.join().unwrap().len(), 3 * 60 * 1024);
}

#[test]
fn guest_sending_beyond_its_credit_is_reset() {
    let mut h = harness();
    let (mut c, local) = h.host_connect(52, 64 * 1024);
    // The client never reads, so the socket buffer fills and the device buffers the rest.
    let chunk = vec![0u8; 64 * 1024];
    let mut got_rst = false;
    for _ in 0..40 {
        h.send(ghdr(op::RW, 52, local), &chunk);
        if let Some((p, _)) = h.try_recv() {
            if p.op == op::RST {
                got_rst = true;
                break;
            }
        }
    }
    if !got_rst {
        let (p, _) = h.recv();
        assert_eq!(p.op, op::RST);
    }
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
    assert!(closed(&mut c));
}

#[test]
fn guest_connect_reaches_the_listener_at_path_port() {
    let mut h = harness();
    let listener = UnixListener::bind(uds::port_path(&h.path, 1234)).unwrap();
    h.send(ghdr(op::REQUEST, 5000, 1234), &[]);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_port, p.dst_port), (op::RESPONSE, 1234, 5000));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    h.send(ghdr(op::RW, 5000, 1234), b"from guest");
    assert_eq!(read_n(&mut s, 10), b"from guest");
    s.write_all(b"from host").unwrap();
    let (p, data) = h.recv();
    assert_eq!((p.op, data.as_slice()), (op::RW, &b"from host"[..]));
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mut h = harness();
    h.send(ghdr(op::REQUEST, 5000, 4321), &[]);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_port, p.dst_port), (op::RST, 4321, 5000));
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn malformed_packets_are_dropped_and_the_next_good_packet_works() {
    let mut h = harness();
    // Header shorter than 44 bytes: dropped silently.
    h.send_raw(&[0u8; 20], &[(0, 20)]);
    // len larger than the payload: RST (ports identify it).
    let mut bad = ghdr(op::RW, 10, 20);
    bad.len = 100;
    h.send_raw(&bad.to_bytes(), &[(0, HDR_LEN as u32)]);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_port, p.dst_port), (op::RST, 20, 10));
    // len over 64 KiB: RST.
    bad.len = MAX_PKT_LEN + 1;
    h.send_raw(&bad.to_bytes(), &[(0, HDR_LEN as u32)]);
    assert_eq!(h.recv().0.op, op::RST);
    // Wrong CIDs: dropped silently.
    let mut wrong = ghdr(op::REQUEST, 10, 20);
    wrong.dst_cid = 7;
    h.send(wrong, &[]);
    wrong = ghdr(op::REQUEST, 10, 20);
    wrong.src_cid = 9;
    h.send(wrong, &[]);
    h.expect_silence(50);
    // Unknown op, wrong type, data for an unknown connection: RST each.
    h.send(ghdr(99, 10, 20), &[]);
    assert_eq!(h.recv().0.op, op::RST);
    let mut dgram = ghdr(op::REQUEST, 10, 20);
    dgram.kind = 2;
    h.send(dgram, &[]);
    assert_eq!(h.recv().0.op, op::RST);
    h.send(ghdr(op::RW, 10, 20), b"x");
    assert_eq!(h.recv().0.op, op::RST);
    // An RST for an unknown connection gets no answer.
    h.send(ghdr(op::RST, 10, 20), &[]);
    // Header split over two descriptors with the payload in a third: fine.
    let _l = UnixListener::bind(uds::port_path(&h.path, 20)).unwrap();
    let good = ghdr(op::REQUEST, 10, 20).to_bytes();
    h.send_raw(&good, &[(0, 30), (30, 14)]);
    let (p, _) = h.recv();
    assert_eq!(p.op, op::RESPONSE);
    assert_eq!(h.dev.lock().unwrap().connection_count(), 1);
}

#[test]
fn unknown_op_on_a_connection_resets_it() {
    let mut h = harness();
    let (mut c, local) = h.host_connect(52, 4096);
    h.send(ghdr(42, 52, local), &[]);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_port), (op::RST, local));
    assert!(closed(&mut c));
}

#[test]
fn bad_host_clients_are_closed() {
    const HANDSHAKE: Duration = Duration::from_millis(200);
    let mut h = harness_with(HANDSHAKE);
    let mut garbage = h.client();
    garbage.write_all(b"HELLO\n").unwrap();
    assert!(closed(&mut garbage));
    let mut long = h.client();
    long.write_all(&[b'C'; 100]).unwrap();
    assert!(closed(&mut long));
    // Taken before connecting, so the device's deadline (accept + 200 ms) is after start + 200 ms.
    let start = Instant::now();
    let mut silent = h.client();
    // `closed` reads with a timeout of `WAIT`: a hang guard.
    assert!(closed(&mut silent));
    // Behaviour, not speed: a silent client is given its whole handshake time.
    assert!(
        start.elapsed() >= HANDSHAKE,
        "a silent client was closed after {:?}, before its {HANDSHAKE:?} handshake time",
        start.elapsed()
    );
    h.expect_silence(10);
    // The device still serves.
    h.host_connect(52, 4096);
}

#[test]
fn guest_that_never_answers_a_request_times_out() {
    let mut h = harness_with(Duration::from_millis(200));
    let mut c = h.client();
    c.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = h.recv();
    assert!(closed(&mut c));
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_port), (op::RST, req.src_port));
}

#[test]
fn host_eof_sends_shutdown_and_guest_shutdown_closes_with_rst() {
    let mut h = harness();
    let (mut c, local) = h.host_connect(52, 4096);
    c.write_all(b"last").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let (p, data) = h.recv();
    assert_eq!((p.op, data.as_slice()), (op::RW, &b"last"[..]));
    let (p, _) = h.recv();
    assert_eq!((p.op, p.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
    // The guest may still answer before closing.
    h.send(ghdr(op::RW, 52, local), b"reply");
    assert_eq!(read_n(&mut c, 5), b"reply");
    let mut shut = ghdr(op::SHUTDOWN, 52, local);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(shut, &[]);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.dst_port), (op::RST, 52));
    assert!(closed(&mut c));
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
}

#[test]
fn guest_shutdown_send_half_closes_the_host_socket() {
    let mut h = harness();
    let (mut c, local) = h.host_connect(52, 4096);
    h.send(ghdr(op::RW, 52, local), b"bye");
    let mut shut = ghdr(op::SHUTDOWN, 52, local);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    assert_eq!(read_n(&mut c, 3), b"bye");
    assert!(closed(&mut c)); // EOF
    c.write_all(b"still").unwrap();
    let (p, data) = h.recv();
    assert_eq!((p.op, data.as_slice()), (op::RW, &b"still"[..]));
}

#[test]
fn transport_reset_event_drops_all_connections() {
    let mut h = harness();
    let (mut c, _) = h.host_connect(52, 4096);
    let ev_buf = h.layout.ev_buf;
    h.ev.set_desc(&h.mem, 0, ev_buf, 4, 2, 0);
    h.ev.offer(&h.mem, 0);
    h.mem
        .write_obj(0xffff_ffffu32, GuestAddress(ev_buf))
        .unwrap();
    assert!(h.dev.lock().unwrap().send_transport_reset());
    assert_eq!(h.ev.poll_used(&h.mem), Some((0, 4)));
    let id: u32 = h.mem.read_obj(GuestAddress(ev_buf)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert!(closed(&mut c));
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
    // Without an event buffer the connections still go, and the caller is told.
    assert!(!h.dev.lock().unwrap().send_transport_reset());
    // The device keeps serving new connections.
    h.host_connect(52, 4096);
}

#[test]
fn many_connections_are_served_concurrently() {
    let mut h = harness();
    let mut conns: Vec<(UnixStream, u32)> = (0..8).map(|i| h.host_connect(100 + i, 4096)).collect();
    for (i, (c, _)) in conns.iter_mut().enumerate() {
        c.write_all(format!("msg{i}").as_bytes()).unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..8 {
        let (p, data) = h.recv();
        assert_eq!(p.op, op::RW);
        assert_eq!(data, format!("msg{}", p.dst_port - 100).as_bytes());
        seen.push(p.dst_port);
    }
    seen.sort_unstable();
    assert_eq!(seen, (100..108).collect::<Vec<_>>());
    for (i, (c, local)) in conns.iter_mut().enumerate() {
        h.send(
            ghdr(op::RW, 100 + i as u32, *local),
            format!("re{i}").as_bytes(),
        );
        assert_eq!(read_n(c, 3), format!("re{i}").as_bytes());
    }
    let _ = &h.dir;
}

#[test]
fn device_reset_closes_host_connections() {
    let mut h = harness();
    let (mut c, _) = h.host_connect(52, 4096);
    h.dev.lock().unwrap().reset();
    assert!(closed(&mut c));
    // A client arriving while the device is not active is closed at once.
    let mut late = h.client();
    late.write_all(b"CONNECT 52\n").unwrap();
    assert!(closed(&mut late));
}

#[test]
fn a_paused_device_accepts_no_host_client_and_writes_no_guest_memory_until_resumed() {
    let mut h = harness();
    let (mut c, local) = h.host_connect(52, 64 * 1024);
    h.el.pause().unwrap();
    // A host client in the listen backlog, data from an established connection, a guest
    // packet on the tx queue: none may be served while paused.
    let mut waiting = h.client();
    waiting.write_all(b"CONNECT 53\n").unwrap();
    c.write_all(b"while paused").unwrap();
    assert!(h.tx_submit(ghdr(op::CREDIT_REQUEST, 52, local), &[]));
    h.kick_tx();
    let memory_before = {
        let mut m = vec![0u8; h.layout.mem_size as usize];
        h.mem.read_slice(&mut m, GuestAddress(0)).unwrap();
        m
    };
    // Nothing can happen while parked, however long we look; a short look is enough to fail
    // a device that was not parked.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut memory_after = vec![0u8; memory_before.len()];
    h.mem
        .read_slice(&mut memory_after, GuestAddress(0))
        .unwrap();
    assert!(
        memory_before == memory_after,
        "guest memory changed while paused"
    );
    assert_eq!(h.dev.lock().unwrap().connection_count(), 1);
    h.el.resume().unwrap();
    // Everything is served after the resume.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let (hdr, data) = h.recv();
        seen.push((hdr.op, hdr.dst_port, data));
    }
    assert!(seen.iter().any(|(o, p, _)| *o == op::REQUEST && *p == 53));
    assert!(seen.iter().any(|(_, _, d)| d == b"while paused"));
    assert!(seen.iter().any(|(o, _, _)| *o == op::CREDIT_UPDATE));
}

#[test]
fn a_tx_avail_index_far_ahead_sets_needs_reset_and_spins_nothing() {
    let mut h = harness();
    let (_c, _) = h.host_connect(52, 64 * 1024);
    h.tx.publish_avail_idx(&h.mem, 0x1000);
    h.kick_tx();
    // Hang guard only: the device reports DEVICE_NEEDS_RESET and drops the connections.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !h.dev.lock().unwrap().is_broken() {
        assert!(
            std::time::Instant::now() < deadline,
            "no DEVICE_NEEDS_RESET"
        );
        h.wait_irq(std::time::Duration::from_millis(10));
    }
    assert_eq!(h.dev.lock().unwrap().connection_count(), 0);
    // Paused and resumed, it still serves nothing and the loop is idle (it answers a pause).
    h.el.pause().unwrap();
    h.el.resume().unwrap();
    let mut late = h.client();
    late.write_all(b"CONNECT 52\n").unwrap();
    assert!(closed(&mut late), "a broken device accepted a connection");
}

#[test]
fn vsock_state_round_trips_and_corrupted_states_are_refused() {
    use crate::virtio::vsock::{VsockResources, VsockState};
    use snapshot::Persist;
    let dir = tempfile::tempdir().unwrap();
    let v = Vsock::new(42, dir.path().join("a")).unwrap();
    let saved = v.save();
    let json = serde_json::to_string(&saved).unwrap();
    let back: VsockState = serde_json::from_str(&json).unwrap();
    drop(v);
    let restored = Vsock::restore(
        VsockResources {
            uds_path: dir.path().join("a"),
            listener: None,
        },
        &back,
    )
    .unwrap();
    assert_eq!(restored.save(), saved);
    let bad = |f: fn(&mut VsockState), field: &str| {
        let mut s = saved.clone();
        f(&mut s);
        let e = Vsock::restore(
            VsockResources {
                uds_path: dir.path().join("b"),
                listener: None,
            },
            &s,
        )
        .err()
        .unwrap();
        assert_eq!(e.field, field, "{e}");
    };
    bad(|s| s.cid = 2, "cid");
    bad(|s| s.next_local_port = 5, "next_local_port");
}

#[test]
fn a_restored_device_tells_the_guest_its_connections_are_gone_once_active() {
    use super::testing::{Ring, VIRTQ_DESC_F_WRITE};
    use crate::virtio::{GuestMemory, Interrupt};
    use snapshot::Persist;
    let dir = tempfile::tempdir().unwrap();
    let saved = Vsock::new(7, dir.path().join("a")).unwrap().save();
    let mut v = Vsock::restore(
        VsockResources {
            uds_path: dir.path().join("a"),
            listener: None,
        },
        &saved,
    )
    .unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    let (_rx, rxq) = Ring::new(0, 16);
    let (_tx, txq) = Ring::new(0x4000, 16);
    let (mut ev, evq) = Ring::new(0x8000, 16);
    ev.set_desc(&mem, 0, 0x10_0000, 8, VIRTQ_DESC_F_WRITE, 0);
    ev.offer(&mem, 0);
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    v.activate(mem.clone(), Interrupt::new(irq), vec![rxq, txq, evq], 0)
        .unwrap();
    assert_eq!(ev.poll_used(&mem), Some((0, 4)));
    let id: u32 = mem.read_obj(GuestAddress(0x10_0000)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
}

#[test]
fn the_connection_bound_stays_below_the_open_file_limit() {
    // The common default soft limit: the device alone can no longer use up the descriptors.
    assert_eq!(connection_bound(1024), 1024 - 256 - 64);
    assert!(connection_bound(1024) < 1024);
    // A raised limit gives the full bound, no limit too.
    assert_eq!(connection_bound(1 << 20), MAX_CONNECTIONS);
    assert_eq!(connection_bound(u64::MAX), MAX_CONNECTIONS);
    // A limit below the reserve leaves no connection rather than underflowing.
    assert_eq!(connection_bound(100), 0);
    // The device reads the limit it was created under.
    let dir = tempfile::tempdir().unwrap();
    let v = Vsock::new(3, dir.path().join("s")).unwrap();
    let limit = open_file_limit().unwrap();
    assert_eq!(v.max_connections(), connection_bound(limit));
}

#[test]
fn guest_connects_beyond_the_bound_get_rst_and_leave_the_others_alone() {
    let mut h = harness();
    h.dev.lock().unwrap().set_max_connections(2);
    let listener = UnixListener::bind(uds::port_path(&h.path, 1234)).unwrap();
    for guest_port in [5000, 5001] {
        h.send(ghdr(op::REQUEST, guest_port, 1234), &[]);
        let (p, _) = h.recv();
        assert_eq!((p.op, p.dst_port), (op::RESPONSE, guest_port));
    }
    h.send(ghdr(op::REQUEST, 5002, 1234), &[]);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.src_port, p.dst_port), (op::RST, 1234, 5002));
    assert_eq!(h.dev.lock().unwrap().connection_count(), 2);
    // The two that got in still carry data.
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    h.send(ghdr(op::RW, 5000, 1234), b"still here");
    assert_eq!(read_n(&mut s, 10), b"still here");
    // One closes: the next REQUEST gets in.
    h.send(ghdr(op::RST, 5001, 1234), &[]);
    h.send(ghdr(op::REQUEST, 5003, 1234), &[]);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.dst_port), (op::RESPONSE, 5003));
}

#[test]
fn host_clients_beyond_the_bound_are_closed_without_reaching_the_guest() {
    let mut h = harness();
    h.dev.lock().unwrap().set_max_connections(1);
    let (mut first, local) = h.host_connect(52, 64 * 1024);
    let mut extra = h.client();
    extra.write_all(b"CONNECT 52\n").unwrap();
    assert!(closed(&mut extra), "a client beyond the bound was kept");
    // No REQUEST went to the guest for it, and the first connection still works.
    first.write_all(b"ping\n").unwrap();
    let (p, data) = h.recv();
    assert_eq!(
        (p.op, p.src_port, data.as_slice()),
        (op::RW, local, &b"ping\n"[..])
    );
    assert_eq!(h.dev.lock().unwrap().connection_count(), 1);
}

#[test]
fn the_bound_cannot_be_raised_past_the_open_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = Vsock::new(3, dir.path().join("s")).unwrap();
    v.set_max_connections(usize::MAX);
    assert_eq!(
        v.max_connections(),
        connection_bound(open_file_limit().unwrap())
    );
    v.set_max_connections(5);
    assert_eq!(v.max_connections(), 5);
}

/// CPU time this process used so far (all threads), without opening a file.
fn process_cpu_time() -> Duration {
    // SAFETY: all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into `usage`, which outlives the call.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Runs `test` alone in a child process (it changes process-wide limits), with `env` set.
fn in_child_process(test: &str, env: &str) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env, "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{test} failed in its child process:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "{test} did not run in its child process"
    );
}

#[test]
fn running_out_of_descriptors_pauses_the_listener_instead_of_spinning() {
    const CHILD: &str = "STRATA_VSOCK_EMFILE_CHILD";
    if std::env::var_os(CHILD).is_none() {
        in_child_process(
            "virtio::vsock::tests::running_out_of_descriptors_pauses_the_listener_instead_of_spinning",
            CHILD,
        );
        return;
    }
    // A short handshake timeout: the timer that resumes the listener ticks every 100 ms.
    let mut h = harness_with(Duration::from_millis(400));
    // Use up every descriptor but one, which the client's socket takes: the device's accept
    // then fails with EMFILE while the client waits in the backlog.
    let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    let lim = libc::rlimit {
        rlim_cur: open_now + 16,
        rlim_max: open_now + 16,
    };
    // SAFETY: setrlimit reads one rlimit that outlives the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut filler = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        filler.push(f);
    }
    filler.pop();
    let mut c = h.client();
    c.write_all(b"CONNECT 52\n").unwrap();
    // Only the device thread has anything to do while this one sleeps.
    let before = process_cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let spent = process_cpu_time() - before;
    // A loop spinning on the readable listener burns the whole second.
    assert!(
        spent < Duration::from_millis(300),
        "the device thread used {spent:?} of 1 s while out of descriptors"
    );
    // Descriptors come back: the client is accepted and its REQUEST reaches the guest.
    drop(filler);
    let (p, _) = h.recv();
    assert_eq!((p.op, p.dst_port), (op::REQUEST, 52));
}
