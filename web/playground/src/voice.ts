// A voice call in the session's LiveKit room: the mic published, the agent's audio played, its
// transcriptions (livekit-agents 1.x text streams on `lk.transcription`) and state shown.
import {
  DisconnectReason,
  type Participant,
  type RemoteParticipant,
  type RemoteTrack,
  Room,
  RoomEvent,
  Track,
  type TextStreamReader,
} from "livekit-client";

import type { LiveKitGrant } from "./api";

export type AgentState = "initializing" | "listening" | "thinking" | "speaking" | string;

export interface CallEvents {
  /** A transcription segment, partial until `final`; the same `id` is sent again as it grows. */
  transcript(segment: { id: string; speaker: "you" | "agent"; text: string; final: boolean }): void;
  agentState(state: AgentState | null): void;
  speaking(who: { you: boolean; agent: boolean }): void;
  notice(text: string): void;
  ended(reason: string): void;
}

const isAgent = (p: Participant) => p.isAgent || p.attributes["lk.agent.state"] !== undefined;

export class Call {
  readonly room = new Room({ adaptiveStream: true, dynacast: true });
  private readonly audio = new Map<string, HTMLMediaElement>();

  constructor(
    private readonly events: CallEvents,
    private readonly audioParent: HTMLElement,
  ) {
    const room = this.room;
    room.on(RoomEvent.TrackSubscribed, (track: RemoteTrack) => {
      if (track.kind !== Track.Kind.Audio) return;
      const element = track.attach();
      element.dataset.agentAudio = "";
      this.audio.set(track.sid ?? "", element);
      this.audioParent.append(element);
    });
    room.on(RoomEvent.TrackUnsubscribed, (track: RemoteTrack) => {
      track.detach().forEach((element) => element.remove());
      this.audio.delete(track.sid ?? "");
    });
    room.on(RoomEvent.ParticipantAttributesChanged, (_changed: Record<string, string>, participant: Participant) => {
      if (isAgent(participant)) this.events.agentState(participant.attributes["lk.agent.state"] ?? null);
    });
    room.on(RoomEvent.ParticipantConnected, (participant: RemoteParticipant) => {
      if (isAgent(participant)) this.events.agentState(participant.attributes["lk.agent.state"] ?? "joined");
    });
    room.on(RoomEvent.ParticipantDisconnected, (participant: RemoteParticipant) => {
      if (isAgent(participant)) this.events.agentState(null);
    });
    room.on(RoomEvent.ActiveSpeakersChanged, (speakers: Participant[]) => {
      this.events.speaking({ you: speakers.some((p) => p.isLocal), agent: speakers.some((p) => !p.isLocal && isAgent(p)) });
    });
    room.on(RoomEvent.DataReceived, (payload: Uint8Array, _participant, _kind, topic?: string) => {
      // The API tells a caller left alone that no agent came (morgana.api.services.agentless).
      if (topic === "morgana.status") this.events.notice(new TextDecoder().decode(payload));
    });
    room.on(RoomEvent.Disconnected, (reason?: DisconnectReason) =>
      this.events.ended(reason === undefined ? "disconnected" : (DisconnectReason[reason] ?? String(reason)).toLowerCase()),
    );
    room.registerTextStreamHandler("lk.transcription", (reader, from) => void this.readTranscript(reader, from.identity));
  }

  async start(grant: LiveKitGrant): Promise<void> {
    await this.room.connect(grant.serverUrl, grant.participantToken);
    await this.room.localParticipant.setMicrophoneEnabled(true);
    // Autoplay: the click that started the call lets the agent's audio play.
    await this.room.startAudio();
    for (const participant of this.room.remoteParticipants.values()) {
      if (isAgent(participant)) this.events.agentState(participant.attributes["lk.agent.state"] ?? "joined");
    }
  }

  async stop(): Promise<void> {
    await this.room.disconnect();
    this.audio.forEach((element) => element.remove());
    this.audio.clear();
  }

  private async readTranscript(reader: TextStreamReader, identity: string): Promise<void> {
    const attributes = reader.info.attributes ?? {};
    const id = attributes["lk.segment_id"] ?? reader.info.id;
    // The agent transcribes the caller too: those segments name the caller's own track.
    const micSid = this.room.localParticipant.getTrackPublication(Track.Source.Microphone)?.trackSid;
    const transcribed = attributes["lk.transcribed_track_id"];
    const speaker = identity === this.room.localParticipant.identity || (transcribed && transcribed === micSid) ? "you" : "agent";
    let text = "";
    for await (const chunk of reader) {
      text += chunk;
      this.events.transcript({ id, speaker, text, final: false });
    }
    this.events.transcript({ id, speaker, text, final: true });
  }
}
