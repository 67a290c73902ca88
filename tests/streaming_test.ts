/**
 * The streaming plugin driven by real clients, in nbdkit's captive style:
 * qemu-img and nbdcopy write a disk into a FIFO (or socket, file, stdout)
 * read by sha256sum; qemu-img reads a disk out of a FIFO fed by cat; the
 * errors a client can provoke; the progress line as a person sees it in a
 * terminal (tmux).
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { closeSync, existsSync, openSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import {
  captive,
  CLIENT_ENV,
  ourCommand,
  ourShell,
  requireTool,
  type Result,
  run,
  scratch,
  sh,
  shQuote,
} from "./helpers.ts";

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;

/** The checksum sha256sum prints first. */
function sum(text: string): string {
  return text.trim().split(/\s+/)[0];
}

/** Our stderr must never carry a stack trace or the progress line (stderr is not a terminal). */
function assertCleanStderr(r: Result): void {
  assert.doesNotMatch(r.stderr, /Uncaught| {4}at |\r|streaming: \d/, r.stderr);
}

/**
 * Wait (up to 30 s) for socat to listen on `sock`, and fail if it does not:
 * otherwise `write=`/`read=` would make a FIFO at that path.
 */
async function socatListens(sock: string): Promise<void> {
  for (let i = 0; i < 1500 && !existsSync(sock); i++) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  assert.ok(existsSync(sock), "socat listens");
}

describe("streaming plugin with real clients", () => {
  let dir: string;
  let cleanup: () => void;
  const img: Record<string, { raw: string; qcow2: string; sha: string }> = {};
  let n = 0;
  /** A fresh path in the scratch folder. */
  const path = (name: string) => join(dir, `${name}-${++n}`);

  before(() => {
    for (const tool of ["qemu-img", "nbdcopy", "nbdsh", "sha256sum", "socat", "tmux"]) {
      requireTool(tool);
    }
    ({ dir, cleanup } = scratch());
    // Random data (nothing to skip), and a sparse disk: a few MiB of data among holes.
    const dense = join(dir, "dense.raw");
    const sparse = join(dir, "sparse.raw");
    const blocks = [0, 3, 17, 64, 65, 100, 200, 255]
      .map((mb) =>
        `head -c 1M /dev/urandom | dd of=${sparse} bs=1M seek=${mb} conv=notrunc status=none`
      )
      .join(" && ");
    const r = sh(
      `head -c ${SIZE} /dev/urandom > ${dense} && truncate -s ${SIZE} ${sparse} && ${blocks} && ` +
        `qemu-img convert -f raw -O qcow2 ${dense} ${dense}.qcow2 && ` +
        `qemu-img convert -f raw -O qcow2 ${sparse} ${sparse}.qcow2`,
    );
    assert.equal(r.status, 0, r.stderr);
    for (const [name, raw] of [["dense", dense], ["sparse", sparse]]) {
      img[name] = { raw, qcow2: `${raw}.qcow2`, sha: sum(sh(`sha256sum ${raw}`).stdout) };
    }
  });

  after(() => cleanup());

  /**
   * Run our command line directly (no shell: Deno's node:child_process
   * requotes shell scripts that start our runtime), `stdin` from a file,
   * hashing what it writes on stdout.
   */
  function ours(
    args: string[],
    stdin?: string,
  ): Promise<{ status: number; stderr: string; sha: string }> {
    const [cmd, ...pre] = ourCommand();
    const fd = stdin === undefined ? "ignore" : openSync(stdin, "r");
    const child = spawn(cmd, [...pre, ...args], { env: CLIENT_ENV, stdio: [fd, "pipe", "pipe"] });
    if (typeof fd === "number") closeSync(fd);
    const hash = createHash("sha256");
    let stderr = "";
    child.stdout!.on("data", (d: Uint8Array) => hash.update(d));
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (d: string) => stderr += d);
    return new Promise((resolve) =>
      child.on("close", (code) => resolve({ status: code ?? 1, stderr, sha: hash.digest("hex") }))
    );
  }

  /**
   * Start `sha256sum < FIFO` (the FIFO made first), run the captive server
   * with `params` and `script`, and return both results.
   */
  async function throughFifo(
    params: (fifo: string) => string[],
    script: string,
  ): Promise<{ server: Result; sha: string }> {
    const fifo = path("fifo");
    assert.equal(sh(`mkfifo ${fifo}`).status, 0);
    const reader = run(["/bin/sh", "-c", `sha256sum < ${shQuote(fifo)}`]);
    const server = await captive(["streaming", ...params(fifo)], script);
    const r = await reader;
    assert.equal(r.status, 0, r.stderr);
    return { server, sha: sum(r.stdout) };
  }

  for (const kind of ["dense", "sparse"]) {
    test(`qemu-img convert of a ${kind} 256 MiB qcow2 into write=FIFO: the raw checksum`, async () => {
      const { server, sha } = await throughFifo(
        (fifo) => [`write=${fifo}`],
        `qemu-img convert -n ${img[kind].qcow2} -O raw "$nbd"`,
      );
      assert.equal(server.status, 0, server.stderr);
      assertCleanStderr(server);
      assert.equal(sha, img[kind].sha);
    });
  }

  test("pipe= (the original name), and size= given", async () => {
    const { server, sha } = await throughFifo(
      (fifo) => [`pipe=${fifo}`, `size=${SIZE}`],
      `nbdinfo --size "$uri" >&2 && qemu-img convert -n ${img.dense.qcow2} -O raw "$nbd"`,
    );
    assert.equal(server.status, 0, server.stderr);
    assert.match(server.stderr, new RegExp(`^${SIZE}$`, "m"));
    assert.equal(sha, img.dense.sha);
  });

  test("the default size is (2^63 - 2^30) & ~511", async () => {
    const r = await captive(["streaming", "write=/dev/null"], 'nbdinfo --size "$uri"');
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), "9223372035781033984");
  });

  test("qemu-img convert -W (writes out of order) through the window", async () => {
    for (const kind of ["dense", "sparse"]) {
      const { server, sha } = await throughFifo(
        (fifo) => [`write=${fifo}`],
        `qemu-img convert -W -m 16 -n ${img[kind].qcow2} -O raw "$nbd"`,
      );
      assert.equal(server.status, 0, server.stderr);
      assert.equal(sha, img[kind].sha, kind);
    }
  });

  test("nbdcopy as the writer: parallel writes and zeroes through the window", async () => {
    for (const kind of ["dense", "sparse"]) {
      const { server, sha } = await throughFifo(
        (fifo) => [`write=${fifo}`, `size=${SIZE}`],
        `nbdcopy --requests=64 -- [ qemu-nbd -f qcow2 ${img[kind].qcow2} ] "$uri"`,
      );
      assert.equal(server.status, 0, server.stderr);
      assertCleanStderr(server);
      assert.equal(sha, img[kind].sha, kind);
    }
  });

  test("a FIFO that does not exist is created; the server serves while its open waits", async () => {
    const fifo = path("new-fifo");
    const out = path("sum");
    // The reader starts only once the client runs: the server must already be serving.
    const r = await captive(
      ["streaming", `write=${fifo}`],
      `test -p ${fifo} && nbdinfo --size "$uri" >/dev/null && ` +
        `(sha256sum < ${fifo} > ${out} &) && ` +
        `qemu-img convert -n ${img.sparse.qcow2} -O raw "$nbd"`,
    );
    assert.equal(r.status, 0, r.stderr);
    for (let i = 0; i < 100 && !(existsSync(out) && statSync(out).size > 0); i++) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.equal(sum(readFileSync(out, "utf8")), img.sparse.sha);
  });

  test("write= to a Unix socket, a regular file and standard output", async () => {
    const sock = path("sock");
    const listener = run(["/bin/sh", "-c", `socat -u UNIX-LISTEN:${sock} - | sha256sum`]);
    await socatListens(sock);
    const viaSocket = await captive(
      ["streaming", `write=${sock}`],
      `qemu-img convert -n ${img.sparse.qcow2} -O raw "$nbd"`,
    );
    assert.equal(viaSocket.status, 0, viaSocket.stderr);
    assert.equal(sum((await listener).stdout), img.sparse.sha);

    const file = path("out.raw");
    sh(`echo previous contents > ${file}`);
    const toFile = await captive(
      ["streaming", `write=${file}`],
      `qemu-img convert -n ${img.sparse.qcow2} -O raw "$nbd"`,
    );
    assert.equal(toFile.status, 0, toFile.stderr);
    assert.equal(sum(sh(`sha256sum ${file}`).stdout), img.sparse.sha);

    const toStdout = await ours(
      [
        "-U",
        "-",
        "streaming",
        "write=-",
        "--run",
        `qemu-img convert -n ${img.sparse.qcow2} -O raw "$nbd"`,
      ],
    );
    assert.equal(toStdout.status, 0, toStdout.stderr);
    assert.equal(toStdout.sha, img.sparse.sha);
  });

  test("the pipe of a FIFO, and of stdout, is enlarged to 1 MiB (both ends wake less)", async () => {
    // The other end asks the kernel (F_GETPIPE_SZ) once the first byte went through.
    const probe = (open: string, io: string) =>
      `import fcntl, os, sys\n${open}\n${io}\nprint(fcntl.fcntl(fd, 1032))\n` +
      `while os.read(fd, 1 << 16): pass\n`;
    const readEnd = (fifo: string) =>
      run([
        "python3",
        "-c",
        probe(`fd = os.open(${JSON.stringify(fifo)}, os.O_RDONLY)`, "os.read(fd, 1)"),
      ]);
    const write = 'nbdsh -u "$uri" -c \'h.pwrite(b"x" * 4096, 0)\'';

    const out = path("fifo");
    sh(`mkfifo ${out}`);
    const reader = readEnd(out);
    const w = await captive(["streaming", `write=${out}`], write);
    assert.equal(w.status, 0, w.stderr);
    assert.equal((await reader).stdout.trim(), String(MiB));

    const inp = path("fifo");
    sh(`mkfifo ${inp}`);
    const size = run([
      "python3",
      "-c",
      `import fcntl, os, time\nfd = os.open(${JSON.stringify(inp)}, os.O_WRONLY)\n` +
      // F_GETPIPE_SZ, until the server has enlarged the pipe (it does so once
      // it has opened it) or 10 s have passed.
      `os.write(fd, bytes(4096))\nend = time.time() + 10\n` +
      `while fcntl.fcntl(fd, 1032) < ${MiB} and time.time() < end: time.sleep(0.05)\n` +
      `print(fcntl.fcntl(fd, 1032))\n`,
    ]);
    const r = await captive(
      ["streaming", `read=${inp}`, "size=4096"],
      "nbdsh -u \"$uri\" -c 'assert h.pread(4096, 0) == bytes(4096)'",
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal((await size).stdout.trim(), String(MiB));

    // Python starts the server itself, with its stdout on a pipe (Deno's
    // node:child_process would requote a shell line that starts Deno).
    const stdout = await run([
      "python3",
      "-c",
      probe(
        "import json, subprocess\n" +
          "p = subprocess.Popen(json.loads(sys.argv[1]), stdout=subprocess.PIPE)\n" +
          "fd = p.stdout.fileno()",
        "os.read(fd, 1)",
      ) + "sys.exit(p.wait())\n",
      JSON.stringify([...ourCommand(), "-U", "-", "streaming", "write=-", "--run", write]),
    ]);
    assert.equal(stdout.status, 0, stdout.stderr);
    assert.equal(stdout.stdout.trim(), String(MiB));
  });

  test("read=FIFO fed by cat, consumed by qemu-img convert: identical images", async () => {
    for (const kind of ["dense", "sparse"]) {
      const fifo = path("in-fifo");
      const out = path("out.qcow2");
      assert.equal(sh(`mkfifo ${fifo}`).status, 0);
      const feeder = run(["/bin/sh", "-c", `cat ${img[kind].raw} > ${fifo}`]);
      const r = await captive(
        ["streaming", `read=${fifo}`, `size=${SIZE}`],
        `qemu-img convert -f raw "$nbd" -O qcow2 ${out}`,
      );
      assert.equal(r.status, 0, r.stderr);
      assertCleanStderr(r);
      assert.equal((await feeder).status, 0);
      const cmp = sh(`qemu-img compare -f raw ${img[kind].raw} -F qcow2 ${out}`);
      assert.equal(cmp.status, 0, cmp.stdout + cmp.stderr);
    }
  });

  test("read= with a format probe (sector 0 read more than once), from stdin and a socket", async () => {
    const out = path("probe.qcow2");
    // No -f: qemu probes the format, reading the first sectors again.
    const fromStdin = await ours(
      [
        "-U",
        "-",
        "streaming",
        "read=-",
        `size=${SIZE}`,
        "--run",
        `qemu-img convert "$nbd" -O qcow2 ${out}`,
      ],
      img.dense.raw,
    );
    assert.equal(fromStdin.status, 0, fromStdin.stderr);
    assert.equal(sh(`qemu-img compare -f raw ${img.dense.raw} -F qcow2 ${out}`).status, 0);

    const sock = path("sock");
    const feeder = run(["/bin/sh", "-c", `socat -u FILE:${img.sparse.raw} UNIX-LISTEN:${sock}`]);
    await socatListens(sock);
    const out2 = path("sock.qcow2");
    const viaSocket = await captive(
      ["streaming", `read=${sock}`, `size=${SIZE}`],
      `qemu-img convert -f raw "$nbd" -O qcow2 ${out2}`,
    );
    assert.equal(viaSocket.status, 0, viaSocket.stderr);
    await feeder;
    assert.equal(sh(`qemu-img compare -f raw ${img.sparse.raw} -F qcow2 ${out2}`).status, 0);
  });

  test("read=: a stream shorter than size= is EIO with the offset where it ended", async () => {
    const fifo = path("short-fifo");
    assert.equal(sh(`mkfifo ${fifo}`).status, 0);
    const feeder = run(["/bin/sh", "-c", `head -c 3M ${img.dense.raw} > ${fifo}`]);
    const r = await captive(
      ["streaming", `read=${fifo}`, "size=8M"],
      `qemu-img convert -f raw "$nbd" -O raw ${path("short.raw")}`,
    );
    await feeder;
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /The stream ended at offset 3145728/);
    assertCleanStderr(r);
  });

  test("a backwards write: EIO with offsets, then every request and connection fails", async () => {
    const r = await captive(
      ["streaming", "write=/dev/null"],
      `nbdsh -u "$uri" -c '
import os
h.pwrite(b"\\1" * 65536, 0)
try:
    h.pwrite(b"\\2" * 512, 4096)
    print("accepted")
except nbd.Error as e:
    print("first", e.errno)
try:
    h.pwrite(b"\\3" * 512, 65536)
    print("accepted")
except nbd.Error as e:
    print("later", e.errno)
h2 = nbd.NBD()
try:
    h2.connect_uri(os.environ["uri"])
    print("connected")
except nbd.Error as e:
    print("new connection refused")
'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "first EIO\nlater EIO\nnew connection refused\n");
    assert.match(
      r.stderr,
      /error: .*Write at offset 4096 \(512 bytes\) is behind the stream: the first 65536 bytes have already been streamed/,
    );
    assert.match(r.stderr, /The stream stopped earlier: Write at offset 4096/);
    assertCleanStderr(r);
  });

  test("reads: zeroes past the highest write, EIO behind it", async () => {
    const r = await captive(
      ["streaming", "write=/dev/null"],
      `nbdsh -u "$uri" -c '
h.pwrite(b"\\1" * 4096, 0)
print(h.pread(512, 8192) == bytes(512))
try:
    h.pread(512, 0)
except nbd.Error as e:
    print("EIO")
h.pwrite(b"\\1" * 4096, 4096)
h.flush()
'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "True\nEIO\n");
    assert.match(r.stderr, /Cannot read back offset 0 \(512 bytes\)/);
  });

  test("a write that overflows the window: EIO saying so, with offsets", async () => {
    const r = await captive(
      ["streaming", "write=/dev/null", "window=1M"],
      `nbdsh -u "$uri" -c '
h.pwrite(bytes(512 * 1024), 4 * 1024 * 1024)
try:
    h.pwrite(bytes(1024 * 1024), 8 * 1024 * 1024)
    print("accepted")
except nbd.Error as e:
    print("overflow refused")
try:
    h.pwrite(bytes(512), 0)
except nbd.Error as e:
    print("stopped")
'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "overflow refused\nstopped\n");
    assert.match(
      r.stderr,
      /Write at offset 8388608 \(1048576 bytes\) would overflow the reorder window \(window=1 MiB\): 524288 bytes are held waiting for offset 0/,
    );
    assertCleanStderr(r);
  });

  test("the reader exiting early: a clean EIO and one-line messages, no crash", async () => {
    const fifo = path("fifo");
    assert.equal(sh(`mkfifo ${fifo}`).status, 0);
    const reader = run(["/bin/sh", "-c", `head -c 1M < ${fifo} > /dev/null`]);
    const r = await captive(
      ["streaming", `write=${fifo}`],
      `qemu-img convert -n ${img.dense.qcow2} -O raw "$nbd"; echo "qemu-img status $?"`,
    );
    await reader;
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /qemu-img status [1-9]/);
    assert.match(
      r.stderr,
      /error: .*The reader of '.*fifo-\d+' went away \(broken pipe\) after \d+ bytes/,
    );
    assertCleanStderr(r);
  });

  test("parameters: none, or two, is a one-line error naming them (exit status 1)", async () => {
    const none = await captive(["streaming"], "true");
    assert.equal(none.status, 1);
    assert.equal(none.stderr.trim().split("\n").length, 1, none.stderr);
    assert.match(none.stderr, /write=FILE.*read=FILE/);
    const two = await captive(["streaming", "write=/dev/null", "read=/dev/zero"], "true");
    assert.equal(two.status, 1);
    assert.equal(two.stderr.trim().split("\n").length, 1, two.stderr);
    assert.match(two.stderr, /not write= and read=/);
    // With -s, stdin and stdout are the NBD connection: `-` cannot be the stream.
    const stdio = await run([...ourCommand(), "-s", "streaming", "write=-"]);
    assert.equal(stdio.status, 1, stdio.stderr);
    assert.equal(stdio.stderr.trim().split("\n").length, 1, stdio.stderr);
    assert.match(stdio.stderr, /write=- cannot be used with -s/);
    const help = sh(`${ourShell()} streaming --help`);
    assert.equal(help.status, 0, help.stderr);
    for (const key of ["pipe=", "write=", "read=", "size=", "window="]) {
      assert.ok(help.stdout.includes(key), `--help does not mention ${key}`);
    }
  });

  test("the progress line, as a person sees it in a terminal", async () => {
    const session = `nbdkit-ts-progress-${process.pid}`;
    const fifo = path("tty-fifo");
    const marker = path("done");
    assert.equal(sh(`mkfifo ${fifo}`).status, 0);
    // A slow reader (under 100 MiB/s) so that the transfer lasts a few seconds.
    const reader = run([
      "/bin/sh",
      "-c",
      `exec < ${fifo}; ` +
      `while [ "$(dd bs=1M count=1 iflag=fullblock status=none | wc -c)" -gt 0 ]; do sleep 0.01; done`,
    ]);
    const command = `${ourShell()} -U - streaming write=${fifo} size=${SIZE} --run ` +
      shQuote(`qemu-img convert -n ${img.dense.qcow2} -O raw "$nbd"`) +
      `; echo "exit status $?"; touch ${marker}; sleep 60`;
    const capture = () => sh(`tmux capture-pane -p -t ${session}`).stdout;
    try {
      const started = sh(
        `tmux new-session -d -s ${session} -x 120 -y 20 ${shQuote(command)}`,
      );
      assert.equal(started.status, 0, started.stderr);
      let seen = "";
      const deadline = Date.now() + 90_000; // the transfer takes seconds; more on a loaded machine
      while (Date.now() < deadline && !existsSync(marker)) {
        await new Promise((resolve) => setTimeout(resolve, 50));
        const screen = capture();
        if (/streaming: .*%/.test(screen)) seen = screen;
      }
      assert.match(
        seen,
        /streaming: [\d.]+ [KMG]iB written, [\d.]+ [KM]iB\/s, \d{1,2}%, ETA \d+:\d\d/,
        `no progress line on the terminal; last screen:\n${capture()}`,
      );
      assert.equal(seen.match(/streaming:/g)?.length, 1, "one line, rewritten in place");
      while (Date.now() < deadline && !existsSync(marker)) {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      const end = capture();
      assert.match(end, /exit status 0/, end);
      assert.doesNotMatch(end, /streaming: [\d.]+ /, `the progress line was not cleared:\n${end}`);
    } finally {
      sh(`tmux kill-session -t ${session}`);
      sh(`exec 3<>${fifo}; exec 3>&-`); // unblock the reader if it still waits to open
      await reader;
    }
  });
});
