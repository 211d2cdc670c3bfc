"""One line per fsync.sh run: messages/s, server CPU per message, syncs."""
import json, sys

run, mode, store = sys.argv[1], sys.argv[2], sys.argv[3]
d = json.load(open("target/fsync-fan.json"))
s = json.load(open("target/fsync-stats.json"))
msgs = s["messages"]
cpu = s["cpu_seconds"]
st = s.get("store", {})
print(run, mode.ljust(10), store.ljust(3),
      "msgs=%d msg_per_s=%.0f cpu_us_per_msg=%.1f syncs=%s sync_max_us=%s commit_max_us=%s missing=%s" % (
          msgs, d["deliveries_per_s"] / 10, cpu * 1e6 / msgs, st.get("store_syncs"),
          st.get("store_sync_max_us"), st.get("store_commit_max_us"), d.get("missing")), "restarts=%s tail=%s" % (st.get("store_wal_restarts"), st.get("store_tail_checkpoints")))
