// Drives the review page the way a clinician would, in headless Chromium.
//
//   CHROMIUM_PATH  browser binary (default /usr/bin/chromium)
//   LAUNCH_URL     URL that goes through the SMART launch and lands on /app/
//   SCREENSHOT     where to write a full-page PNG
//   EXPECT_TITLE   optional substring expected in the reviewed item's title
//
// Prints one JSON line on stdout: {"ok": true, ...} and exits 0, or
// {"ok": false, "error": ...} (page text on stderr) and exits 1.
import { chromium } from 'playwright-core';

const CHROMIUM_PATH = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const LAUNCH_URL = process.env.LAUNCH_URL;
const SCREENSHOT = process.env.SCREENSHOT;
const EXPECT_TITLE = process.env.EXPECT_TITLE || '';
const TIMEOUT = 30_000;

const consoleErrors = [];
let browser;
let page;

const stripAnsi = (text) => String(text).replace(/\u001b\[[0-9;]*m/g, '');

function fail(error, extra) {
  const out = Object.assign({ ok: false, error: stripAnsi(error) }, extra || {}, { consoleErrors });
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

async function main() {
  if (!LAUNCH_URL) throw new Error('LAUNCH_URL is not set');
  if (!SCREENSHOT) throw new Error('SCREENSHOT is not set');

  browser = await chromium.launch({
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  const context = await browser.newContext({
    viewport: { width: 1280, height: 900 },
    ignoreHTTPSErrors: true,
  });
  page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  page.on('console', (msg) => {
    if (msg.type() === 'error') {
      const loc = msg.location();
      consoleErrors.push(loc && loc.url ? `${msg.text()} (${loc.url}:${loc.lineNumber})` : msg.text());
    }
  });
  page.on('pageerror', (err) => consoleErrors.push(`pageerror: ${err && err.message ? err.message : String(err)}`));

  await page.goto(LAUNCH_URL, { waitUntil: 'domcontentloaded', timeout: TIMEOUT });
  await page.waitForURL((url) => url.pathname === '/app/', { timeout: TIMEOUT });

  // Wait for an item that is ready for review (it may become ready live, via SSE).
  const ready = page.locator('#items [data-status="ready"]').first();
  await ready.waitFor({ state: 'visible', timeout: TIMEOUT });
  const id = await ready.getAttribute('data-id');
  if (!id) throw new Error('ready item has no data-id');

  // Open it with the keyboard: focus, then Enter.
  const item = page.locator(`#items [data-id="${cssString(id)}"]`);
  await item.focus();
  const focused = await page.evaluate(() => document.activeElement && document.activeElement.getAttribute('data-id'));
  if (focused !== id) throw new Error(`could not focus list item ${id} (focused: ${focused})`);
  await page.keyboard.press('Enter');

  await page.waitForFunction((wanted) => {
    const d = document.querySelector('#detail');
    return d && d.dataset.id === wanted && document.querySelector('#rationale');
  }, id, { timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelectorAll('#checklist li').length > 0, null, { timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelectorAll('#facts tbody tr').length > 0, null, { timeout: TIMEOUT });

  const title = ((await page.locator('#detail h2').first().textContent()) || '').trim();
  if (EXPECT_TITLE && !title.includes(EXPECT_TITLE)) {
    throw new Error(`title ${JSON.stringify(title)} does not contain ${JSON.stringify(EXPECT_TITLE)}`);
  }
  const criteria = await page.locator('#checklist li.criterion').count();
  const facts = await page.locator('#facts tbody tr').count();
  const statusBefore = ((await page.locator('#status').textContent()) || '').trim();
  if (!statusBefore.includes('Ready for review')) throw new Error(`status before submit is ${JSON.stringify(statusBefore)}`);

  // Edit the rationale.
  const rationale = page.locator('#rationale');
  const existing = await rationale.inputValue();
  const edited = `${existing.replace(/\s+$/, '')} Reviewed by clinician.`;
  await rationale.fill(edited);

  // Submit, then try to submit again straight away: the button must already be disabled.
  const submit = page.locator('#submit');
  await submit.click();
  const submitDisabledAfterClick = await page.evaluate(() => {
    const b = document.querySelector('#submit');
    return !b || b.disabled;
  });
  if (!submitDisabledAfterClick) {
    await submit.click({ timeout: 2_000 }).catch(() => {});
  }

  await page.locator(`#items [data-status="submitted"][data-id="${cssString(id)}"]`).waitFor({ state: 'visible', timeout: TIMEOUT });
  await page.waitForFunction(() => {
    const s = document.querySelector('#status');
    return s && s.textContent.includes('Submitted');
  }, null, { timeout: TIMEOUT });
  const sentText = ((await page.locator('#detail').textContent()) || '');
  if (!sentText.includes('Sent to the chart')) throw new Error('detail does not say "Sent to the chart"');
  const finalRationale = await page.locator('#rationale').inputValue().catch(() => '');

  await screenshot();

  const out = {
    ok: true,
    submittedId: id,
    title,
    submitDisabledAfterClick,
    facts,
    criteria,
    rationaleKept: finalRationale.includes('Reviewed by clinician.'),
    consoleErrors,
  };
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

// A full-page picture with sticky parts (list pane, submit bar) where a reader
// expects them: grow the viewport to the whole page instead of stitching.
async function screenshot() {
  await page.evaluate(() => window.scrollTo(0, 0)).catch(() => {});
  const height = await page.evaluate(() => Math.ceil(document.documentElement.scrollHeight)).catch(() => 0);
  const size = page.viewportSize();
  if (size && height > size.height) {
    await page.setViewportSize({ width: size.width, height: Math.min(height, 8000) }).catch(() => {});
  }
  await page.waitForTimeout(600); // let the packet frame and fonts settle
  await page.screenshot({ path: SCREENSHOT, fullPage: true });
}

function cssString(s) {
  return String(s).replace(/["\\]/g, '\\$&');
}

// Never outlive the Rust test that runs us, whatever hangs.
const watchdog = setTimeout(() => {
  fail('review.mjs gave up after 150 s');
  process.exit(1);
}, 150_000);
watchdog.unref();

let code = 0;
try {
  await main();
} catch (err) {
  code = 1;
  fail(err && err.message ? err.message : err);
  if (page) {
    try {
      const text = await page.evaluate(() => (document.body ? document.body.innerText : ''));
      process.stderr.write(`page URL: ${page.url()}\npage text:\n${String(text).slice(0, 2000)}\n`);
    } catch (e) {
      process.stderr.write(`could not read the page text: ${e && e.message ? e.message : e}\n`);
    }
    if (SCREENSHOT) {
      await screenshot().catch(() => {});
    }
  }
} finally {
  if (browser) await browser.close().catch(() => {});
}
process.exit(code);
