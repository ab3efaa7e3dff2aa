#!/usr/bin/python3
"""A serial RFID reader for the booted-Debian suite: it streams distinct chips, one line each, on
a pseudo-terminal at a steady rate, and behaves like a real UART: what it sends while nobody has
the port open is lost (a pty would otherwise keep it for the next opener, hiding the loss the
suite measures).

    reader-sim LINK RATE STATE [OWNER_GROUP] [FIRST]

LINK: a symlink made to the pty (the gateway's reader.port); RATE: reads per second; STATE: a
file rewritten several times a second with the counters as JSON; FIRST: the first sequence
number (chips are the number as 8 hex digits). Stops at SIGTERM, leaving the final counters.
"""
import json, os, pty, select, signal, sys, time, tty, grp

link, rate, state = sys.argv[1], float(sys.argv[2]), sys.argv[3]
group = sys.argv[4] if len(sys.argv) > 4 else "dialout"
seq = int(sys.argv[5]) - 1 if len(sys.argv) > 5 else 0

master, slave = pty.openpty()
tty.setraw(slave)
name = os.ttyname(slave)
os.chown(name, 0, grp.getgrnam(group).gr_gid)
os.chmod(name, 0o660)
tmp = link + ".new"
if os.path.lexists(tmp):
    os.unlink(tmp)
os.symlink(name, tmp)
os.rename(tmp, link)
os.close(slave)

stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)

poller = select.poll()
poller.register(master, select.POLLOUT)
def port_open():
    # POLLHUP on the master: no process holds the slave (the "serial port") open.
    return not any(ev & select.POLLHUP for _, ev in poller.poll(0))

counters = {"first": seq + 1, "sent": 0, "dropped": 0, "dropped_seqs": [], "last": seq, "pty": name, "done": False}
def save():
    with open(state + ".tmp", "w") as f:
        json.dump(counters, f)
    os.rename(state + ".tmp", state)

save()
# Start when the gateway has the port open.
while not stop and not port_open():
    time.sleep(0.01)
period = 1.0 / rate
next_at = time.monotonic()
last_save = 0.0
while not stop:
    seq += 1
    counters["last"] = seq
    if port_open():
        os.write(master, b"%08X\r\n" % seq)
        counters["sent"] += 1
    else:
        counters["dropped"] += 1
        counters["dropped_seqs"].append(seq)
    # Whatever the gateway writes back is read and ignored (nothing, for this format).
    while select.select([master], [], [], 0)[0]:
        try:
            os.read(master, 4096)
        except OSError:
            break
    now = time.monotonic()
    if now - last_save > 0.1:
        save()
        last_save = now
    next_at += period
    time.sleep(max(0.0, next_at - time.monotonic()))
counters["done"] = True
save()
