// Baseline for Postroom's bench: Nodemailer's pooled SMTP transport sending
// COUNT messages straight to the sink (no queue, no worker). Run by bench/run.py
// with NODE_PATH pointing at a temporary `npm install nodemailer`.
//
// usage: node nodemailer_send.js PORT COUNT BODY_FILE ID_PREFIX MAX_CONNECTIONS [ATTACHMENT_FILE]
// prints "START <epoch ms>" just before the first sendMail and
// "DONE <epoch ms> ok=<n> failed=<n>" when every message has settled, then waits
// (at most 20 s) for the bench to stop it.
'use strict';

const fs = require('fs');
const nodemailer = require('nodemailer');

async function main() {
  const [port, count, bodyFile, prefix, maxConnections, attachmentFile] = process.argv.slice(2);
  const total = Number(count);
  const text = fs.readFileSync(bodyFile, 'utf8');
  // the same invoice on every message, as Postroom's rows send it
  const attachments = attachmentFile
    ? [{ filename: 'invoice.bin', contentType: 'application/octet-stream', content: fs.readFileSync(attachmentFile) }]
    : [];
  const transport = nodemailer.createTransport({
    pool: true,
    host: '127.0.0.1',
    port: Number(port),
    secure: false,
    ignoreTLS: true,
    maxConnections: Number(maxConnections),
    maxMessages: 100, // Postroom's max_messages_per_connection
  });
  let ok = 0;
  let failed = 0;
  let lastError = '';
  console.log(`START ${Date.now()}`);
  const sends = [];
  for (let i = 0; i < total; i += 1) {
    sends.push(
      transport
        .sendMail({
          from: 'nodemailer@example.com',
          to: `rcpt${i}@example.net`,
          subject: `bench ${i}`,
          text,
          attachments,
          messageId: `<${prefix}.${i}@example.com>`,
        })
        .then(
          () => { ok += 1; },
          (err) => { failed += 1; lastError = String(err); },
        ),
    );
  }
  await Promise.all(sends);
  console.log(`DONE ${Date.now()} ok=${ok} failed=${failed}${lastError ? ` last_error=${lastError}` : ''}`);
  transport.close();
  // stay up (bounded) until the bench has read this process's CPU figures and stops it
  setTimeout(() => process.exit(0), 20000);
}

const watchdog = setTimeout(() => {
  console.error('nodemailer_send: gave up after 600 s');
  process.exit(2);
}, 600000);
watchdog.unref();

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
