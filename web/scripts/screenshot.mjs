// `npm run screenshot`: regenerates docs/dashboard.png, the README's picture of the dashboard.
//
// Starts `sensorwire demo` (the binary of `cargo build`, or SENSORWIRE_BIN) on a free port with a
// temporary database, opens the dashboard in Debian's Chromium the way a newcomer does (it signs in
// by itself as the demo organisation), waits for the simulator's next excursion (one every 40 s)
// so the picture shows a live alert, and saves a 1440×900 screenshot. Needs `npm run build` first.

import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { Gateway, byTestId, launchBrowser, sleep } from '../tests/helpers.js';

const OUT = process.env.SCREENSHOT_OUT || fileURLToPath(new URL('../../docs/dashboard.png', import.meta.url));

const gw = new Gateway({ command: 'demo' });
let browser;
try {
  await gw.start();
  browser = await launchBrowser();
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  await page.goto(`${gw.url}/`);
  await page.waitForSelector(`${byTestId('connection-status')}[data-state="connected"]`, { timeout: 15_000 });
  console.log('waiting for the demo’s next excursion (up to 50 s)…');
  await page.locator('[data-testid^="toast-"][role="alert"]').first().waitFor({ timeout: 50_000 });
  await sleep(2500); // a few more live readings, the toast's slide-in done
  await page.screenshot({ path: OUT });
  console.log(`saved ${path.relative(process.cwd(), OUT)}`);
} finally {
  await browser?.close().catch(() => {});
  await gw.dispose();
}
