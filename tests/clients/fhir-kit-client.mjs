// A third-party FHIR client (npm fhir-kit-client) against a running fhirgate.
// Run by tests/it/client.rs with FHIR_BASE and FHIR_TOKEN (a bearer credential) set; prints one JSON line and exits 0 on success.
import { Client } from 'fhir-kit-client';

const client = new Client({ baseUrl: process.env.FHIR_BASE, bearerToken: process.env.FHIR_TOKEN });
const checks = [];
function expect(name, ok, detail) {
  checks.push(name);
  if (!ok) {
    console.error(`FAILED: ${name}: ${JSON.stringify(detail)}`);
    process.exit(1);
  }
}

const cs = await client.capabilityStatement();
expect('metadata is an R4 CapabilityStatement', cs.resourceType === 'CapabilityStatement' && cs.fhirVersion === '4.0.1', cs.fhirVersion);

const created = await client.create({
  resourceType: 'Patient',
  body: {
    resourceType: 'Patient',
    identifier: [{ system: 'urn:test:fhir-kit', value: '42' }],
    name: [{ family: 'Client', given: ['Kit'] }],
  },
});
expect('create returns the stored resource', typeof created.id === 'string' && created.meta.versionId === '1', created);

const read = await client.read({ resourceType: 'Patient', id: created.id });
expect('read returns what was created', read.name[0].family === 'Client', read);

const updated = await client.update({ resourceType: 'Patient', id: created.id, body: { ...read, gender: 'female' } });
expect('update makes version 2', updated.meta.versionId === '2' && updated.gender === 'female', updated);

const v1 = await client.vread({ resourceType: 'Patient', id: created.id, version: '1' });
expect('vread returns version 1', v1.meta.versionId === '1' && v1.gender === undefined, v1);

const found = await client.search({ resourceType: 'Patient', searchParams: { identifier: 'urn:test:fhir-kit|42' } });
expect('search by identifier finds it', found.total === 1 && found.entry[0].resource.id === created.id, found);

const tx = await client.transaction({
  body: {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [0, 1, 2, 3, 4].map((n) => ({
      fullUrl: `urn:uuid:00000000-0000-4000-8000-00000000000${n}`,
      resource: {
        resourceType: 'Observation',
        status: 'final',
        code: { coding: [{ system: 'http://loinc.org', code: '8867-4' }] },
        subject: { reference: `Patient/${created.id}` },
        valueQuantity: { value: 60 + n, unit: '/min' },
      },
      request: { method: 'POST', url: 'Observation' },
    })),
  },
});
expect('transaction creates five', tx.type === 'transaction-response' && tx.entry.length === 5, tx);

let page = await client.search({ resourceType: 'Observation', searchParams: { patient: created.id, _count: 2 } });
let seen = 0;
while (page) {
  seen += (page.entry || []).length;
  page = client.nextPage({ bundle: page });
  if (page) page = await page;
}
expect('paging through next links sees all five', seen === 5, seen);

await client.delete({ resourceType: 'Patient', id: created.id });
let status = 0;
try {
  await client.read({ resourceType: 'Patient', id: created.id });
} catch (e) {
  status = e.response && e.response.status;
}
expect('read after delete is 410 Gone', status === 410, status);

console.log(JSON.stringify({ ok: true, checks }));
